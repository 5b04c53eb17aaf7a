"""The project's small trained MoE: shape, Megatron-Core model construction, checkpoint I/O.

A checkpoint folder holds ``config.json`` (:class:`TinyMoEConfig`), ``tokenizer.json`` (a
``tokenizers`` byte-level BPE), ``model.pt`` (the GPTModel state dict at EP = 1, bf16) and the
training record. :func:`load_model` rebuilds the model with the stock Megatron MoE spec or the
PROBE spec, at any EP size (each rank takes its contiguous block of experts).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from megatron_probe import fileformat as ff

CHECKPOINT_FORMAT = "megatron_probe.tiny_moe.v1"
DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                  "checkpoints", "tiny-moe-v1")


@dataclass
class TinyMoEConfig:
    num_layers: int = 6
    hidden_size: int = 256
    num_attention_heads: int = 4
    num_experts: int = 32
    topk: int = 4
    expert_ffn_hidden: int = 64
    seq_length: int = 256
    vocab_size: int = 4096
    score_function: str = "softmax"
    format: str = CHECKPOINT_FORMAT

    @classmethod
    def from_json(cls, path: str) -> "TinyMoEConfig":
        """Read a checkpoint's ``config.json``, checking every field; raises
        :class:`~megatron_probe.fileformat.InputFileError` (a ValueError) naming the file, the field
        and what was expected."""
        data = ff.load_json(path, f"a checkpoint config.json (format {CHECKPOINT_FORMAT!r})")
        if data.get("format") != CHECKPOINT_FORMAT:
            fmt = data.get("format")
            known = ff.KNOWN_FORMATS.get(fmt) if isinstance(fmt, str) else None
            raise ff.InputFileError(f"{path}: format {fmt!r} is not {CHECKPOINT_FORMAT!r}"
                                    + (f" (that is {known} file)" if known else ""))
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = set(data) - set(known)
        if unknown:
            raise ff.InputFileError(f"{path}: unknown config fields {sorted(unknown)}; valid: {known}")
        for name in known:
            if name == "format":
                continue
            if name == "score_function":
                if ff.field(data, name, path, "str") not in ("softmax", "sigmoid"):
                    raise ff.InputFileError(f"{path}: field 'score_function' is {data[name]!r}, expected 'softmax' "
                                            "or 'sigmoid'")
            else:
                ff.field(data, name, path, "int", lo=1)
        if data["topk"] > data["num_experts"]:
            raise ff.InputFileError(f"{path}: field 'topk' is {data['topk']}, expected <= num_experts "
                                    f"({data['num_experts']})")
        if data["hidden_size"] % data["num_attention_heads"]:
            raise ff.InputFileError(f"{path}: field 'num_attention_heads' is {data['num_attention_heads']}, expected a "
                                    f"divisor of hidden_size ({data['hidden_size']})")
        return cls(**data)

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=2)


def transformer_config(cfg: TinyMoEConfig, ep: int = 1, dtype=torch.float32, dispatcher: str = "alltoall",
                       tp: int = 1, pp: int = 1, sp: bool = False, etp: int = 1):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.expert_ffn_hidden, moe_ffn_hidden_size=cfg.expert_ffn_hidden,
        num_moe_experts=cfg.num_experts, moe_router_topk=cfg.topk,
        moe_router_score_function=cfg.score_function, moe_router_pre_softmax=cfg.topk == 1,
        moe_router_dtype="fp32", moe_aux_loss_coeff=0.0, moe_token_dispatcher_type=dispatcher,
        expert_model_parallel_size=ep, tensor_model_parallel_size=tp, expert_tensor_parallel_size=etp,
        sequence_parallel=sp, pipeline_model_parallel_size=pp, pipeline_dtype=dtype if pp > 1 else None,
        gated_linear_unit=True, activation_func=F.silu,
        bias_activation_fusion=False, add_bias_linear=False, normalization="RMSNorm",
        params_dtype=dtype, bf16=dtype == torch.bfloat16, use_cpu_initialization=True,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02,
    )


def layer_spec(cfg: TinyMoEConfig, spec: str = "probe", probe_config=None, sp: bool = False):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_probe.mcore.cpu import SequenceParallelTorchNorm
    from megatron_probe.mcore.router import ProbeRouter
    from megatron_probe.mcore.spec import probe_layer_spec

    stock = get_gpt_layer_local_spec(num_experts=cfg.num_experts, moe_grouped_gemm=False, normalization="RMSNorm")
    if sp:  # the local spec's torch norm refuses sequence parallel; ours is the same norm
        stock.submodules.input_layernorm = stock.submodules.pre_mlp_layernorm = SequenceParallelTorchNorm
    # TopKRouter's gating needs CUDA + Transformer Engine in Megatron-Core 0.16; ProbeRouter
    # inherits its routing and runs anywhere.
    stock.submodules.mlp.submodules.router = ProbeRouter
    if spec == "stock":
        return stock
    if spec == "probe":
        return probe_layer_spec(stock, probe_config)
    raise ValueError(f"spec={spec!r}; valid: 'probe', 'stock'")


def build_model(cfg: TinyMoEConfig, spec: str = "probe", probe_config=None, ep: int = 1, dtype=torch.float32,
                tp: int = 1, pp: int = 1, sp: bool = False, etp: int = 1):
    """GPTModel (learned absolute positions, tied embeddings). The Megatron parallel state must
    be initialised with this EP, TP, expert TP and PP size (TP: Megatron's tensor-parallel
    attention and embeddings; ``etp``: expert TP, 1 or ``tp``, each expert's weights split over
    the TP ranks; ``sp``: Megatron's sequence parallelism over the TP ranks, so each
    holds its share of the sequence outside attention, the MoE layers included; PP: this rank's
    stage, its layers only, with untied output weights, since Megatron-Core 0.16 ties them across
    stages on CUDA only). ``spec='stock'`` uses the stock MoELayer with the ``allgather``
    dispatcher, the one whose stock constructor and forward run on CPU (EP = 1 only)."""
    from megatron.core.models.gpt import GPTModel

    if sp and tp < 2:
        raise ValueError(f"sequence parallel needs tensor parallel size > 1 (it shards the sequence over the TP "
                         f"ranks); got TP {tp}")
    if etp not in (1, tp):
        raise ValueError(f"expert tensor parallel size {etp}: the PROBE layer takes expert TP 1 or equal to TP "
                         f"({tp})")

    if spec == "stock" and ep != 1 and not torch.cuda.is_available():
        raise ValueError("the stock Megatron MoE dispatchers need CUDA for EP > 1; use spec='probe' on CPU")
    dispatcher = "alltoall" if (spec == "probe" or torch.cuda.is_available()) else "allgather"
    tc = transformer_config(cfg, ep=ep, dtype=dtype, dispatcher=dispatcher, tp=tp, pp=pp, sp=sp, etp=etp)
    stage = {}
    if pp > 1:
        from megatron.core import parallel_state

        rank = parallel_state.get_pipeline_model_parallel_rank()
        stage = dict(pre_process=rank == 0, post_process=rank == pp - 1)
    block = layer_spec(cfg, spec, probe_config, sp)
    if sp:  # the final norm too (Megatron would pick its torch norm for it)
        from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

        from megatron_probe.mcore.cpu import SequenceParallelTorchNorm

        block = TransformerBlockSubmodules(layer_specs=[block] * get_num_layers_to_build(tc),
                                           layer_norm=SequenceParallelTorchNorm)
    return GPTModel(config=tc, transformer_layer_spec=block,
                    vocab_size=cfg.vocab_size, max_sequence_length=cfg.seq_length,
                    position_embedding_type="learned_absolute", share_embeddings_and_output_weights=pp == 1, **stage)


_EXPERT_KEY = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")


# Megatron's tensor-parallel splits of the non-expert weights: (key suffix, dimension). The fused
# QKV weight is laid out per query group, so contiguous rows are whole groups.
_TP_SPLITS = ((".self_attention.linear_qkv.weight", 0), (".self_attention.linear_proj.weight", 1),
              ("embedding.word_embeddings.weight", 0), ("output_layer.weight", 0))


_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def stage_state_dict(full: dict, num_layers: int, pp: int, stage: int) -> dict:
    """A whole model's state dict -> pipeline stage ``stage``'s of ``pp``: its layers renumbered
    from 0, the embeddings on the first stage, the final norm and the output layer (the tied
    word embeddings: Megatron-Core 0.16 unties them across stages on CPU) on the last."""
    per = num_layers // pp
    out = {}
    for k, v in full.items():
        m = _LAYER_KEY.match(k)
        if m:
            layer = int(m.group(1))
            if layer // per == stage:
                out[f"decoder.layers.{layer - stage * per}.{m.group(2)}"] = v
        elif k.startswith("embedding."):
            if stage == 0:
                out[k] = v
        elif stage == pp - 1:
            out[k] = v
    if stage == pp - 1 and pp > 1:
        out["output_layer.weight"] = full["embedding.word_embeddings.weight"]
    return out


def shard_state_dict(full: dict, ep: int, rank: int, num_experts: int, tp: int = 1, tp_rank: int = 0,
                     etp: int = 1) -> dict:
    """EP = 1, TP = 1 state dict -> the state dict of EP rank ``rank`` (its contiguous expert
    block) and TP rank ``tp_rank`` (its share of the attention and embedding weights, and with
    expert TP ``etp`` = ``tp`` its share of each expert's weights; with expert TP 1 experts are
    whole). The checkpoint's experts are gated."""
    from megatron_probe.mcore.expert_shards import expert_weight_shard

    L = num_experts // ep
    out = {}
    for k, v in full.items():
        m = _EXPERT_KEY.match(k)
        if m:
            e = int(m.group(2))
            if e // L == rank:
                which = "fc1" if m.group(3).startswith(".linear_fc1.") else "fc2"
                out[f"{m.group(1)}{e - rank * L}{m.group(3)}"] = expert_weight_shard(v, which, etp, tp_rank, True)
            continue
        for suffix, dim in _TP_SPLITS:
            if tp > 1 and k.endswith(suffix):
                if v.shape[dim] % tp:
                    raise ValueError(f"{k}: {v.shape[dim]} rows along dimension {dim} do not split over TP {tp}")
                v = v.chunk(tp, dim=dim)[tp_rank].clone()
                break
        out[k] = v
    return out


def expected_state_shapes(cfg: TinyMoEConfig) -> Dict[str, tuple]:
    """Every key of the EP = 1 state dict of :func:`build_model` and its shape (tied embeddings, no
    biases, RMSNorm, gated experts): what ``model.pt`` must hold for ``cfg``."""
    H, F, E, V, S = cfg.hidden_size, cfg.expert_ffn_hidden, cfg.num_experts, cfg.vocab_size, cfg.seq_length
    out = {"embedding.word_embeddings.weight": (V, H), "embedding.position_embeddings.weight": (S, H)}
    for l in range(cfg.num_layers):
        pre = f"decoder.layers.{l}."
        out.update({pre + "input_layernorm.weight": (H,), pre + "self_attention.linear_proj.weight": (H, H),
                    pre + "self_attention.linear_qkv.weight": (3 * H, H), pre + "pre_mlp_layernorm.weight": (H,),
                    pre + "mlp.router.weight": (E, H)})
        for e in range(E):
            out[f"{pre}mlp.experts.local_experts.{e}.linear_fc1.weight"] = (2 * F, H)
            out[f"{pre}mlp.experts.local_experts.{e}.linear_fc2.weight"] = (H, F)
    out["decoder.final_layernorm.weight"] = (H,)
    return out


def read_state_dict(path: str, cfg: TinyMoEConfig) -> Dict[str, torch.Tensor]:
    """``model.pt`` (weights-only load), checked against ``cfg``: a dict of floating-point tensors
    with exactly the keys and shapes of :func:`expected_state_shapes`. A file of another model
    is refused naming the first key whose shape differs."""
    sd = ff.torch_load(path, "a checkpoint model.pt (torch.save of the model's state dict)")
    if not isinstance(sd, dict):
        raise ff.InputFileError(f"{path}: holds {ff.kind_of(sd)}, expected the model's state dict (a dict of "
                                "tensors)")
    want = expected_state_shapes(cfg)
    missing = [k for k in want if k not in sd]
    unexpected = [str(k) for k in sd if k not in want]
    if missing or unexpected:
        raise ff.InputFileError(f"{path}: state dict does not match the config beside it (a checkpoint of another "
                                f"model?): missing keys {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
                                f"unexpected keys {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
    for k, shape in want.items():
        v = sd[k]
        if not isinstance(v, torch.Tensor):
            raise ff.InputFileError(f"{path}: key {k!r} is {ff.show(v)}, expected a tensor of shape {shape}")
        if not v.is_floating_point():
            raise ff.InputFileError(f"{path}: key {k!r} has dtype {v.dtype}, expected a floating-point dtype")
        if tuple(v.shape) != shape:
            raise ff.InputFileError(f"{path}: key {k!r} has shape {tuple(v.shape)}, expected {shape} from the config "
                                    "beside it (a checkpoint of another model?)")
    return sd


def read_tokenizer(path: str, cfg: TinyMoEConfig):
    """The checkpoint's ``tokenizers`` tokenizer; its vocabulary must fit the model's."""
    from tokenizers import Tokenizer

    ff.check_file(path, "a tokenizers JSON file (tokenizer.json)")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # the Rust library raises a plain Exception
        raise ff.InputFileError(f"{path}: not a tokenizers JSON file ({str(e).splitlines()[0][:160]})") from None
    if tok.get_vocab_size() > cfg.vocab_size:
        raise ff.InputFileError(f"{path}: tokenizer has {tok.get_vocab_size()} tokens, more than the model's "
                                f"vocab_size {cfg.vocab_size}")
    return tok


def read_checkpoint(path: str, state: bool = True):
    """``(config, tokenizer, state_dict or None)`` of a checkpoint folder, every file checked
    (:func:`TinyMoEConfig.from_json`, :func:`read_tokenizer`, :func:`read_state_dict`); raises
    :class:`~megatron_probe.fileformat.InputFileError` naming the file and what is wrong."""
    if not os.path.isdir(path):
        raise ff.InputFileError(f"checkpoint folder {path!r} " + ("is a file, not a folder" if os.path.exists(path)
                                                                  else "does not exist")
                                + " (expected a folder with config.json, tokenizer.json and model.pt)")
    for name in ("config.json", "tokenizer.json", "model.pt"):
        if not os.path.exists(os.path.join(path, name)):
            raise ff.InputFileError(f"checkpoint folder {path!r} has no {name}")
    cfg = TinyMoEConfig.from_json(os.path.join(path, "config.json"))
    tok = read_tokenizer(os.path.join(path, "tokenizer.json"), cfg)
    sd = read_state_dict(os.path.join(path, "model.pt"), cfg) if state else None
    return cfg, tok, sd


def expected_predictor_meta(cfg: TinyMoEConfig, state_dict: Dict[str, torch.Tensor], residual_hidden: int,
                            layer0: bool = True) -> Dict:
    """What ``PredictorSet.describe()`` gives for this checkpoint's model (without building it):
    the predictor state a run of this checkpoint can load must carry the same."""
    from megatron_probe.policy.predictor import RouterSpec, router_fingerprint

    L = cfg.num_layers
    spec = RouterSpec(cfg.num_experts, cfg.topk, cfg.score_function, pre_softmax=cfg.topk == 1)
    return {"num_layers": L, "layers": list(range(0 if layer0 else 1, L)), "hidden_size": cfg.hidden_size,
            "residual_hidden": residual_hidden, "router": dataclasses.asdict(spec),
            "fingerprint": router_fingerprint(state_dict[f"decoder.layers.{l}.mlp.router.weight"] for l in range(L))}


def check_predictor_state(path: str, cfg: TinyMoEConfig, state_dict: Dict[str, torch.Tensor], residual_hidden: int,
                          layer0: bool = True) -> Dict:
    """Check a predictor state file against a checkpoint (read by :func:`read_checkpoint`) before
    any model is built: every field of the file, and that it was distilled for this model with
    this predictor shape. Returns the file's meta."""
    from megatron_probe.policy.predictor import check_predictor_meta, read_predictor_state

    blob = read_predictor_state(path)
    check_predictor_meta(blob, path, expected_predictor_meta(cfg, state_dict, residual_hidden, layer0))
    return blob["meta"]


def check_trace_for_checkpoint(trace, path: str, cfg: TinyMoEConfig, hidden_layer: Optional[int] = None,
                               min_tokens: int = 1) -> None:
    """A loaded trace (``data.traces.load_trace`` of ``path``) against the checkpoint that will
    replay it: the same layers, experts and top-k, and, given ``hidden_layer``, at least one step
    of ``min_tokens`` or more tokens with hidden states of that layer (of the checkpoint's hidden
    size). Raises :class:`~megatron_probe.fileformat.InputFileError` naming the file and field."""
    for name, mine in (("num_layers", cfg.num_layers), ("num_experts", cfg.num_experts), ("topk", cfg.topk)):
        if getattr(trace, name) != mine:
            raise ff.InputFileError(f"{path}: field 'meta.{name}' is {getattr(trace, name)}, expected {mine} (the "
                                    f"checkpoint's {name}): a trace of another model")
    if hidden_layer is None:
        return
    for i, st in enumerate(trace.steps):
        for l, (_, h) in (st.hidden or {}).items():
            if h.shape[1] != cfg.hidden_size:
                raise ff.InputFileError(f"{path}: field 'steps[{i}].hidden[{l}]' holds states of width {h.shape[1]}, "
                                        f"expected the checkpoint's hidden_size {cfg.hidden_size}")
    if not any(st.hidden and hidden_layer in st.hidden and st.num_tokens >= min_tokens for st in trace.steps):
        raise ff.InputFileError(f"{path}: the trace has no hidden states of layer {hidden_layer} (field "
                                f"'steps[*].hidden') in any step{f' of at least {min_tokens} tokens' if min_tokens > 1 else ''}; "
                                "record it with tools/record_traces.py --hidden-fraction 1.0")


def load_model(path: str = DEFAULT_CHECKPOINT, spec: str = "probe", probe_config=None, ep: int = 1,
               rank: int = 0, dtype=torch.float32, tp: int = 1, tp_rank: int = 0, pp: int = 1, stage: int = 0,
               sp: bool = False, etp: int = 1):
    """(model, tokenizer, config) from a checkpoint folder, in eval mode, for EP rank ``rank`` of
    ``ep``, TP rank ``tp_rank`` of ``tp`` (sequence parallel if ``sp``; experts split over TP if
    ``etp`` = ``tp`` > 1) and pipeline stage ``stage`` of ``pp``. Every file is checked first
    (:func:`read_checkpoint`): a bad one raises
    :class:`~megatron_probe.fileformat.InputFileError` (a ValueError) naming it."""
    cfg, tok, full = read_checkpoint(path)
    if cfg.num_experts % ep:
        raise ValueError(f"checkpoint has {cfg.num_experts} experts, not divisible by EP {ep}")
    check_tensor_parallel(cfg, tp)
    check_pipeline_parallel(cfg, pp)
    model = build_model(cfg, spec, probe_config, ep, dtype, tp=tp, pp=pp, sp=sp, etp=etp)
    if pp > 1:
        full = stage_state_dict(full, cfg.num_layers, pp, stage)
    sd = shard_state_dict(full, ep, rank, cfg.num_experts, tp, tp_rank, etp)
    own = model.state_dict()
    sd = {k: (v.to(own[k].dtype) if isinstance(v, torch.Tensor) and k in own else v) for k, v in sd.items()}
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # a shape mismatch
        raise ValueError(f"checkpoint {path!r} does not match the model: {str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path!r} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.eval()
    return model, tok, cfg


def check_tensor_parallel(cfg: TinyMoEConfig, tp: int) -> None:
    """Refuse a TP size the model's heads or vocabulary do not split over."""
    for name in ("num_attention_heads", "vocab_size"):
        if getattr(cfg, name) % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide the model's {name} {getattr(cfg, name)}")


def check_pipeline_parallel(cfg: TinyMoEConfig, pp: int) -> None:
    """Refuse a stage count that does not divide the model's layers."""
    if cfg.num_layers % pp:
        raise ValueError(f"pipeline parallel size {pp} does not divide the model's num_layers {cfg.num_layers}")


def causal_mask(s: int) -> torch.Tensor:
    return torch.triu(torch.ones(s, s, dtype=torch.bool), 1).view(1, 1, s, s)


def forward_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Full-sequence logits ``[b, s, vocab]``."""
    b, s = tokens.shape
    pos = torch.arange(s).unsqueeze(0).expand(b, -1)
    return model(tokens, pos, causal_mask(s))


@torch.no_grad()
def greedy_generate(model, prompt_ids, max_new_tokens: int, max_len: int, eos_id: Optional[int] = None):
    """Plain greedy decoding by full recompute (the reference every engine must equal)."""
    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        window = ids[-max_len:]
        logits = forward_logits(model, torch.tensor([window]))
        nxt = int(logits[0, -1].argmax())
        ids.append(nxt)
        if eos_id is not None and nxt == eos_id:
            break
    return ids[len(prompt_ids):]
