"""Gate-initialised lookahead predictor: which experts will layer L's tokens pick?

For MoE layer ``L >= 1`` the predictor sees ``h``, the hidden state entering layer ``L-1``'s MoE
block (available a whole layer earlier than layer L's own router input), and computes

    logits_hat = W_L h (+ b_L)  +  W2 · SiLU(W1 · h)

where ``(W_L, b_L)`` is a frozen copy of layer L's router and ``W2`` starts at zero, so the
untrained predictor is exactly "layer L's router applied to layer L-1's input". Layer 0 has no
earlier MoE block: its predictor is fed by the input of the transformer layer holding it (before
attention; RMS-normalised here, since the router expects a normalised input), a shorter lead time
but still ahead of its router.

Selection reproduces Megatron-Core's ``topk_routing_with_score_function`` (softmax before or
after top-k, sigmoid with expert bias, group-limited top-k): the same logits give the same experts.

Everything here is plain tensors and ``nn.Module``: no process groups, no Megatron imports.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron_probe import fileformat as ff
from megatron_probe.fileformat import check_format

PREDICTOR_FORMAT = "megatron_probe.predictor"
PREDICTOR_VERSION = 1
SOURCES = ("prev_moe_input", "pre_attention")


@dataclass(frozen=True)
class RouterSpec:
    """What a router's top-k selection depends on besides its logits."""

    num_experts: int
    topk: int
    score_function: str = "softmax"
    pre_softmax: bool = False
    num_groups: Optional[int] = None
    group_topk: Optional[int] = None

    def __post_init__(self):
        if self.score_function not in ("softmax", "sigmoid"):
            raise ValueError(f"score_function={self.score_function!r}; valid: 'softmax', 'sigmoid'")
        if not 1 <= self.topk <= self.num_experts:
            raise ValueError(f"topk={self.topk} must be in 1..num_experts={self.num_experts}")
        if self.group_topk:
            if not self.num_groups or self.num_experts % self.num_groups:
                raise ValueError(f"num_groups={self.num_groups} must divide num_experts={self.num_experts}")
            if not 1 <= self.group_topk <= self.num_groups or self.topk % self.group_topk:
                raise ValueError(f"group_topk={self.group_topk} must be in 1..num_groups={self.num_groups} "
                                 f"and divide topk={self.topk}")


def selection_scores(logits: torch.Tensor, spec: RouterSpec,
                     expert_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The scores Megatron's router takes its top-k of, with its rounding: softmax and sigmoid
    are computed in float32 and cast back to the logits' dtype (bf16 logits give bf16 scores)."""
    if spec.score_function == "softmax":
        return torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits) if spec.pre_softmax else logits
    scores = torch.sigmoid(logits.float()).type_as(logits)
    return scores + expert_bias if expert_bias is not None else scores


def select_topk(logits: torch.Tensor, spec: RouterSpec, expert_bias: Optional[torch.Tensor] = None,
                k: Optional[int] = None) -> torch.Tensor:
    """``[N, k]`` expert ids, best first, as the router would choose them (``k`` defaults to the
    router's top-k; a larger ``k``, capped at the expert count, ranks further experts the same
    way, used for top-2K recall; with group-limited routing experts of unselected groups rank
    after every expert of the selected groups)."""
    k = spec.topk if k is None else min(k, spec.num_experts)
    scores = selection_scores(logits, spec, expert_bias)
    if not spec.group_topk:
        return scores.topk(k, dim=-1)[1]
    n = scores.shape[0]
    per_group = spec.num_experts // spec.num_groups
    group_scores = scores.view(n, spec.num_groups, per_group).topk(spec.topk // spec.group_topk, dim=-1)[0].sum(-1)
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, group_scores.topk(spec.group_topk, dim=-1)[1], True)
    keep = keep.repeat_interleave(per_group, dim=1)
    kept = spec.group_topk * per_group
    ids = scores.masked_fill(~keep, float("-inf")).topk(min(k, kept), dim=-1)[1]
    if k > kept:
        rest = scores.masked_fill(keep, float("-inf")).topk(k - kept, dim=-1)[1]
        ids = torch.cat([ids, rest], dim=1)
    return ids


def expert_counts(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[E]`` int64 tokens per expert from ``[N, K]`` ids (index_add: no host sync on GPU)."""
    flat = ids.reshape(-1)
    if flat.device.type == "cpu":  # one call (bincount's output size would need a sync on GPU)
        out = torch.bincount(flat, minlength=num_experts)
        if out.numel() != num_experts:  # an id >= num_experts (index_add_ raises there too)
            raise IndexError(f"expert id {int(flat.max())} out of range for {num_experts} experts")
        return out
    return torch.zeros(num_experts, dtype=torch.long, device=ids.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.long))


class LookaheadPredictor(nn.Module):
    """Predictor for one target MoE layer (see the module docstring)."""

    def __init__(self, router_weight: torch.Tensor, spec: RouterSpec, residual_hidden: int,
                 router_bias: Optional[torch.Tensor] = None, expert_bias: Optional[torch.Tensor] = None,
                 target_layer: int = 0, source: str = "prev_moe_input",
                 logits_dtype: torch.dtype = torch.float32, generator: Optional[torch.Generator] = None):
        super().__init__()
        if router_weight.dim() != 2 or router_weight.shape[0] != spec.num_experts:
            raise ValueError(f"router weight shape {tuple(router_weight.shape)} is not "
                             f"(num_experts={spec.num_experts}, hidden)")
        if residual_hidden < 0:
            raise ValueError(f"residual_hidden={residual_hidden} must be >= 0 (0: frozen copy only)")
        if source not in SOURCES:
            raise ValueError(f"source={source!r}; valid: {SOURCES}")
        self.spec = spec
        self.target_layer = int(target_layer)
        self.source = source
        self.hidden_size = int(router_weight.shape[1])
        self.residual_hidden = int(residual_hidden)
        # the dtype the router's logits have (its moe_router_dtype): selection rounds like it
        self.logits_dtype = logits_dtype
        # the frozen gate: buffers, so optimisers and the model's state dict never see them
        self.register_buffer("gate_weight", router_weight.detach().float().clone(), persistent=False)
        self.register_buffer("gate_bias", None if router_bias is None else router_bias.detach().float().clone(),
                             persistent=False)
        self.register_buffer("expert_bias", None if expert_bias is None else expert_bias.detach().float().clone(),
                             persistent=False)
        if residual_hidden:
            self.fc1 = nn.Linear(self.hidden_size, residual_hidden, bias=False)
            self.fc2 = nn.Linear(residual_hidden, spec.num_experts, bias=False)
            with torch.no_grad():
                nn.init.normal_(self.fc1.weight, std=self.hidden_size ** -0.5, generator=generator)
                self.fc2.weight.zero_()  # untrained predictor == frozen router copy
        else:
            self.fc1 = self.fc2 = None

    def check_input(self, h: torch.Tensor) -> None:
        if h.shape[-1] != self.hidden_size:
            raise ValueError(f"predictor for layer {self.target_layer} expects hidden size {self.hidden_size}, "
                             f"got input of shape {tuple(h.shape)}")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``[N, E]`` float32 predicted router logits for ``h`` ``[..., H]`` (flattened to rows)."""
        self.check_input(h)
        x = h.reshape(-1, self.hidden_size).float()
        if self.source == "pre_attention":
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        logits = F.linear(x, self.gate_weight, self.gate_bias)
        if self.fc1 is not None:
            # the weights directly, not the modules' calls: the same arithmetic without their
            # hook machinery (this runs once per layer on the serving path)
            logits = logits + F.linear(F.silu(F.linear(x, self.fc1.weight)), self.fc2.weight)
        return logits

    def predict_topk(self, h: torch.Tensor, k: Optional[int] = None) -> torch.Tensor:
        return select_topk(self(h).to(self.logits_dtype), self.spec, self.expert_bias, k)

    def predict_counts(self, h: torch.Tensor) -> torch.Tensor:
        return expert_counts(self.predict_topk(h), self.spec.num_experts)

    def cost(self) -> Dict[str, int]:
        """Parameters and multiply-adds per token, against the router's own."""
        H, E, D = self.hidden_size, self.spec.num_experts, self.residual_hidden
        router = H * E
        extra = H * D + D * E
        return {"router_params": router, "predictor_params": router + extra, "residual_params": extra,
                "router_macs_per_token": router, "predictor_macs_per_token": router + extra}


def distill_loss(pred_logits: torch.Tensor, true_logits: torch.Tensor, spec: RouterSpec,
                 expert_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Distillation loss of predicted against true router logits (mean over tokens).

    Softmax routers: cross-entropy of the predicted distribution against the true router's full
    softmax (equals KL up to the target's constant entropy). Sigmoid routers: per-expert binary
    cross-entropy against the true sigmoid scores (the expert bias is a shared additive term and
    does not enter)."""
    true_logits = true_logits.detach().float()
    pred_logits = pred_logits.float()
    if spec.score_function == "softmax":
        target = torch.softmax(true_logits, dim=-1)
        return -(target * F.log_softmax(pred_logits, dim=-1)).sum(-1).mean()
    return F.binary_cross_entropy_with_logits(pred_logits, torch.sigmoid(true_logits), reduction="none").sum(-1).mean()


def router_fingerprint(weights: Iterable[torch.Tensor]) -> str:
    """Hash of the routers' weights (rounded to bf16, so fp32 and bf16 copies of one checkpoint
    agree): predictor state is only valid for the model whose routers it was built from."""
    h = hashlib.sha1()
    for w in weights:
        t = w.detach().to("cpu", torch.bfloat16).contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


class PredictorSet(nn.Module):
    """One :class:`LookaheadPredictor` per predicted MoE layer of a model."""

    def __init__(self, predictors: List[LookaheadPredictor], num_layers: int, fingerprint: str):
        super().__init__()
        self.num_layers = int(num_layers)
        self.fingerprint = fingerprint
        self.layers: Dict[int, LookaheadPredictor] = {}
        self.predictors = nn.ModuleDict()
        for p in predictors:
            if not 0 <= p.target_layer < num_layers:
                raise ValueError(f"predictor target layer {p.target_layer} outside 0..{num_layers - 1}")
            if p.target_layer == 0 and p.source != "pre_attention":
                raise ValueError("layer 0 has no previous MoE layer: its predictor must use source='pre_attention'")
            self.predictors[str(p.target_layer)] = p
            self.layers[p.target_layer] = p

    @classmethod
    def from_routers(cls, routers: List[Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]],
                     spec: RouterSpec, residual_hidden: int, layer0: bool = True,
                     seed: int = 0, logits_dtype: torch.dtype = torch.float32) -> "PredictorSet":
        """Build from ``(weight, bias, expert_bias)`` of each MoE layer's router, in layer order."""
        if not routers:
            raise ValueError("a predictor set needs at least one MoE layer")
        # same residual init on every rank, without touching the process's CPU or CUDA RNG; built
        # outside inference mode so the residual stays trainable wherever this is called
        gen = torch.Generator().manual_seed(seed)
        with torch.inference_mode(False):
            preds = []
            for L, (w, b, eb) in enumerate(routers):
                if L == 0 and not layer0:
                    continue
                preds.append(LookaheadPredictor(w, spec, residual_hidden, b, eb, target_layer=L,
                                                source="pre_attention" if L == 0 else "prev_moe_input",
                                                logits_dtype=logits_dtype, generator=gen))
        return cls(preds, len(routers), router_fingerprint(w for w, _, _ in routers))

    def __contains__(self, layer: int) -> bool:
        return layer in self.layers

    def __getitem__(self, layer: int) -> LookaheadPredictor:
        return self.layers[layer]

    @property
    def residual_hidden(self) -> int:
        return next(iter(self.layers.values())).residual_hidden

    def describe(self) -> Dict:
        p = next(iter(self.layers.values()))
        return {"num_layers": self.num_layers, "layers": sorted(self.layers), "hidden_size": p.hidden_size,
                "residual_hidden": p.residual_hidden, "router": asdict(p.spec), "fingerprint": self.fingerprint}

    # ----------------------------------------------------------------- persistence
    def save(self, path: str, extra: Optional[Dict] = None) -> None:
        """Residual weights and what they belong to; the frozen router copies are not stored
        (they are rebuilt from the model, whose fingerprint must match on load)."""
        torch.save({"format": PREDICTOR_FORMAT, "version": PREDICTOR_VERSION, "meta": self.describe(),
                    "state": {k: v.detach().cpu() for k, v in self.state_dict().items()},
                    "extra": extra or {}}, path)

    def load(self, path: str, first_layer: int = 0, model_layers: Optional[int] = None) -> Dict:
        """Load residual weights saved by :meth:`save`; returns the saved ``extra``. Refuses a file
        that is not a predictor state (:func:`read_predictor_state`) and state from another model or
        another predictor shape, naming what differs.

        A pipeline stage's set (``first_layer``, ``model_layers``: this set's layer ``L`` is layer
        ``first_layer + L`` of a model of ``model_layers`` MoE layers) takes its layers' weights
        from a whole model's file. Its first layer, forecast at the stage's input like layer 0, keeps
        its own start where ``first_layer`` > 0: the file's predictor of that layer was distilled on
        another input (the previous MoE layer's). The router fingerprint covers the whole model,
        so the caller checks the file against it (the serving script does, before any worker)."""
        if first_layer or (model_layers is not None and model_layers != self.num_layers):
            return self._load_stage(path, first_layer, model_layers)
        blob = read_predictor_state(path)
        check_predictor_meta(blob, path, self.describe())
        try:
            self.load_state_dict(blob["state"])
        except RuntimeError as e:  # cannot happen after the checks above; named, should it ever
            raise ValueError(f"{path}: predictor state does not fit: {str(e).splitlines()[-1].strip()}") from None
        return blob.get("extra", {})

    def _load_stage(self, path: str, first_layer: int, model_layers: Optional[int]) -> Dict:
        if model_layers is None or not (0 <= first_layer and first_layer + self.num_layers <= model_layers):
            raise ValueError(f"a stage of {self.num_layers} MoE layers from layer {first_layer} does not fit a model "
                             f"of {model_layers} MoE layers")
        blob = read_predictor_state(path)
        theirs = blob["meta"]
        # the whole model's layer count; the fingerprint covers all its routers (the caller's check)
        check_predictor_meta(blob, path, {**self.describe(), "num_layers": model_layers},
                             keys=("num_layers", "hidden_size", "router", "residual_hidden"), fingerprint=False)
        state = {}
        for L in self.layers:
            if L == 0 and first_layer > 0:
                continue  # forecast from the stage's input: the file's predictor saw another input
            g = first_layer + L
            if g not in theirs["layers"]:
                raise ff.InputFileError(f"{path}: predictor state has no predictor for MoE layer {g} (it has "
                                        f"{theirs['layers']}); this stage needs layers {first_layer}.."
                                        f"{first_layer + self.num_layers - 1}")
            for part in ("fc1", "fc2"):
                key = f"predictors.{g}.{part}.weight"
                if key in blob["state"]:
                    state[f"predictors.{L}.{part}.weight"] = blob["state"][key]
        missing, unexpected = self.load_state_dict(state, strict=False)
        if unexpected or any(not (k.startswith("predictors.0.") and first_layer > 0) for k in missing):
            raise ValueError(f"{path}: predictor state does not fit this stage: missing {missing}, unexpected "
                             f"{unexpected}")
        return blob.get("extra", {})


PREDICTOR_WHAT = "a megatron_probe predictor state file (tools/distill_predictor.py)"


def read_predictor_state(path: str) -> Dict:
    """A predictor state file (weights-only load), every field checked: format and version, the
    ``meta`` that says which model and predictor shape it is for, and a ``state`` holding exactly
    the residual weights that shape has (``predictors.<L>.fc1.weight [D, H]``,
    ``predictors.<L>.fc2.weight [E, D]``, floating point). Raises
    :class:`~megatron_probe.fileformat.InputFileError` (a ValueError) naming the file and field."""
    blob = ff.torch_load(path, PREDICTOR_WHAT)
    check_format(blob, path, PREDICTOR_FORMAT, PREDICTOR_VERSION, "predictor state", ff.InputFileError)
    meta = ff.field(blob, "meta", path, "dict")
    n = ff.field(meta, "num_layers", path, "int", "meta.", lo=1)
    H = ff.field(meta, "hidden_size", path, "int", "meta.", lo=1)
    D = ff.field(meta, "residual_hidden", path, "int", "meta.", lo=0)
    layers = ff.int_list(ff.field(meta, "layers", path, "list", "meta.", lo=1), path, "meta.layers", lo=0)
    if any(l >= n for l in layers) or sorted(set(layers)) != layers:
        raise ff.InputFileError(f"{path}: field 'meta.layers' is {layers}, expected distinct layers in increasing "
                                f"order within 0..{n - 1}")
    router = ff.field(meta, "router", path, "dict", "meta.")
    E = ff.field(router, "num_experts", path, "int", "meta.router.", lo=1)
    ff.field(router, "topk", path, "int", "meta.router.", lo=1, hi=E)
    ff.field(meta, "fingerprint", path, "str", "meta.")
    state = ff.field(blob, "state", path, "dict")
    want = {}
    if D:
        for L in layers:
            want[f"predictors.{L}.fc1.weight"] = (D, H)
            want[f"predictors.{L}.fc2.weight"] = (E, D)
    ff.no_unknown_keys(state, list(want), path, "field 'state'")
    for k, shape in want.items():
        ff.tensor_field(state, k, path, "state.", "float", shape=shape)
    ff.field(blob, "extra", path, "dict", default={})
    return blob


def check_predictor_meta(blob: Dict, path: str, mine: Dict,
                         keys=("num_layers", "hidden_size", "router", "layers", "residual_hidden"),
                         fingerprint: bool = True) -> None:
    """Refuse a predictor state (:func:`read_predictor_state`) made for another model or another
    predictor shape than ``mine`` (a :meth:`PredictorSet.describe`), naming what differs: the
    ``keys`` of its meta, and the router fingerprint unless ``fingerprint`` is False."""
    theirs = blob["meta"]
    for key in keys:
        if theirs.get(key) != mine[key]:
            raise ff.InputFileError(f"{path}: predictor state is for another model or predictor shape: {key} is "
                                    f"{theirs.get(key)!r} there, {mine[key]!r} here")
    if fingerprint and theirs.get("fingerprint") != mine["fingerprint"]:
        raise ff.InputFileError(f"{path}: predictor state was distilled for another model: router fingerprint "
                                f"{theirs.get('fingerprint')} there, {mine['fingerprint']} here (rebuild it with "
                                f"tools/distill_predictor.py for this checkpoint)")
