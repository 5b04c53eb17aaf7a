"""Corpus, workloads, trace formats and loaders, the workload generator."""

import json
import os

import pytest
import torch

from megatron_probe.data.corpus import DOMAINS, build_corpus, corpus_fingerprint, is_heldout, roff_to_text
from megatron_probe.data.generator import fit_alpha, generate_counts, observed_request_skew
from megatron_probe.data.traces import (
    RoutingTrace,
    TraceFormatError,
    TraceStep,
    load_any,
    load_coactivation_json,
    load_route_csv,
    load_trace,
    save_trace,
    shared_trace_files,
)
from megatron_probe.data.workloads import SCENARIOS, Request, Workload, build_workload, length_ranges, schedule_steps

SHARED = shared_trace_files()


# ---------------------------------------------------------------------------- corpus
def test_roff_to_text_keeps_accents_and_drops_markup():
    src = '.\\" comment\n.TH FOO 1\n.SH NOM\nbiblioth\\(`eques partag\\(\'ees \\fBgras\\fR f\\(:ur Stra\\(sse \\-x \\[u00E9]t\\(e\'\n.B dpkg\n'
    out = roff_to_text(src)
    assert "bibliothèques partagées" in out and "für Straße" in out and "-x" in out
    assert "gras" in out and "\\f" not in out and "comment" not in out and ".TH" not in out and "dpkg" in out
    assert "ét" in out


def test_corpus_small_cap_is_deterministic_and_split_by_file():
    a = build_corpus(40_000)
    b = build_corpus(40_000)
    assert set(a) == set(DOMAINS)
    assert corpus_fingerprint(a) == corpus_fingerprint(b)
    for d, dc in a.items():
        assert dc.train and dc.heldout, d
        assert all(is_heldout(x.path) for x in dc.heldout)
        assert not any(is_heldout(x.path) for x in dc.train)
    with pytest.raises(ValueError, match="unknown domain 'latin'"):
        build_corpus(1000, domains=("latin",))


# ---------------------------------------------------------------------------- public traces
def _ir(heat, ep):
    loads = heat.view(heat.shape[0], ep, -1).sum(-1).double()
    ir = loads.max(1).values / loads.mean(1)
    return round(float(ir.mean()), 2), round(float(ir.max()), 2)


@pytest.mark.skipif(len(SHARED) < 4, reason="../shared/traces not present")
def test_loaders_read_every_shared_file_and_match_its_readme():
    names = {os.path.basename(f): load_any(f) for f in SHARED}
    assert len(names) == 4
    # the IR table of ../shared/traces/README.md, recomputed from what the loaders return
    expected = {"qwen3-30b-a3b.route.csv": (1.71, 2.55), "gemma4-26b-a4b.route.csv": (1.77, 2.67),
                "coactivation_qwen3-30b-a3b.json": (1.40, 2.03), "coactivation_qwen3-next-80b-a3b.json": (1.17, 1.36)}
    for name, tr in names.items():
        assert _ir(tr.heat, 8) == expected[name], name
        tr.validate()
    q = names["qwen3-30b-a3b.route.csv"]
    assert (q.num_layers, q.num_experts, q.topk, q.n_tokens) == (48, 128, 6, 156)
    assert len(q.steps) == 129 and q.steps[0].num_tokens == 28  # prefill, then 128 decode steps
    # the engine skipped the last layer for prefill tokens except the one that produces output
    assert (q.steps[0].topk_ids[47, :-1] == -1).all() and (q.steps[0].topk_ids[47, -1] >= 0).all()
    assert (q.steps[1].topk_ids >= 0).all()
    n = names["coactivation_qwen3-next-80b-a3b.json"]
    assert (n.num_experts, n.topk, n.n_tokens, len(n.steps)) == (512, 10, 24963, 0)


CSV_HEAD = "# route_trace v1\n# model=x.gguf n_layer=2 n_expert=4 n_expert_used=2\n"
CSV_COLS = "turn,phase,step,layer,slot,expert,weight,residency,expert_bytes\n"


def _csv(tmp_path, rows, head=CSV_HEAD, cols=CSV_COLS):
    p = tmp_path / "t.route.csv"
    p.write_text(head + cols + "".join(rows))
    return str(p)


def _rows(step, phase, layers):
    return [f"0,{phase},{step},{l},{s},{(l + s + step) % 4},0.5,1,10\n" for l in layers for s in range(2)]


def test_route_csv_roundtrip_and_documented_gap(tmp_path):
    rows = _rows(0, 0, [0]) + _rows(1, 0, [0]) + _rows(2, 1, [0, 1]) + _rows(3, 1, [0, 1])
    tr = load_route_csv(_csv(tmp_path, rows))
    assert len(tr.steps) == 3 and tr.steps[0].num_tokens == 2
    assert (tr.steps[0].topk_ids[1] == -1).all()  # prefill lacks the last layer: allowed
    assert tr.heat.sum() == 2 * 2 + 2 * 2 * 2


@pytest.mark.parametrize("rows, head, cols, msg", [
    (_rows(2, 1, [0]), CSV_HEAD, CSV_COLS, r"has no rows for layers \[1\]"),
    (_rows(0, 0, [0]), CSV_HEAD, "turn,phase,step,layer,slot,expert\n", "unknown header"),
    (["0,1,0,0,2,1,0.5,1,10\n"], CSV_HEAD, CSV_COLS, r"slot 2 outside 0\.\.1 \(top-k is 2\)"),
    (["0,1,0,3,0,1,0.5,1,10\n"], CSV_HEAD, CSV_COLS, r"layer 3 outside 0\.\.1"),
    (["0,1,0,0,0,9,0.5,1,10\n"], CSV_HEAD, CSV_COLS, r"expert 9 outside 0\.\.3"),
    (["0,1,0,0,0,1,0.5,1,10\n", "0,1,0,1,0,1,0.5,1,10\n", "0,1,0,1,1,2,0.5,1,10\n"], CSV_HEAD, CSV_COLS,
     "has 1 of 2 slots"),
    (_rows(0, 1, [0, 1]), "# something else\n", CSV_COLS, "first line must be '# route_trace v1'"),
    (_rows(0, 1, [0, 1]), "# route_trace v1\n# model=x n_layer=2\n", CSV_COLS, "preamble has no n_expert="),
])
def test_route_csv_malformed(tmp_path, rows, head, cols, msg):
    with pytest.raises(TraceFormatError, match=msg):
        load_route_csv(_csv(tmp_path, rows, head, cols))


def _coact(tmp_path, **over):
    data = {"model": "m", "n_layers": 2, "n_expert_per_layer": 4, "k": 2, "n_decode_tokens": 10,
            "layers": [{"heat": [5, 5, 5, 5]}, {"heat": [10, 6, 2, 2]}]}
    data.update(over)
    p = tmp_path / "coactivation_m.json"
    p.write_text(json.dumps(data))
    return str(p)


def test_coactivation_loader_and_errors(tmp_path):
    tr = load_coactivation_json(_coact(tmp_path))
    assert tr.heat.tolist() == [[5, 5, 5, 5], [10, 6, 2, 2]] and tr.n_tokens == 10 and not tr.steps
    with pytest.raises(TraceFormatError, match="1 layers listed, n_layers says 2"):
        load_coactivation_json(_coact(tmp_path, layers=[{"heat": [1, 1, 1, 1]}]))
    with pytest.raises(TraceFormatError, match="layer 1 heat has 3 entries, expected 4"):
        load_coactivation_json(_coact(tmp_path, layers=[{"heat": [1, 1, 1, 1]}, {"heat": [1, 1, 1]}]))
    with pytest.raises(TraceFormatError, match="no 'k' field"):
        d = tmp_path / "coactivation_x.json"
        d.write_text(json.dumps({"n_layers": 1, "n_expert_per_layer": 4, "n_decode_tokens": 1, "layers": []}))
        load_coactivation_json(str(d))
    bad = tmp_path / "coactivation_bad.json"
    bad.write_text("{not json")
    with pytest.raises(TraceFormatError, match="not JSON"):
        load_coactivation_json(str(bad))


# ---------------------------------------------------------------------------- own format
def _trace():
    g = torch.Generator().manual_seed(0)
    steps = []
    for t in (3, 0, 5):
        ids = torch.stack([torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(t)]) if t else
                           torch.zeros(0, 2, dtype=torch.long) for _ in range(3)])
        steps.append(TraceStep(topk_ids=ids, topk_probs=torch.rand(3, t, 2, generator=g),
                               request_id=torch.arange(t), position=torch.arange(t), phase=torch.zeros(t, dtype=torch.long),
                               source_rank=torch.arange(t) % 2,
                               hidden={0: (torch.arange(min(t, 2)), torch.randn(min(t, 2), 16, generator=g))}))
    return RoutingTrace(model="toy", num_layers=3, num_experts=8, topk=2, source="test", steps=steps)


def test_own_format_roundtrip(tmp_path):
    tr = _trace()
    path = str(tmp_path / "t.pt")
    save_trace(tr, path)
    back = load_any(path)
    assert back.num_layers == 3 and len(back.steps) == 3 and back.n_tokens == 8
    assert torch.equal(back.heat, tr.heat)
    for a, b in zip(tr.steps, back.steps):
        assert torch.equal(a.topk_ids, b.topk_ids)
        torch.testing.assert_close(a.topk_probs, b.topk_probs, atol=1e-3, rtol=1e-3)
        assert torch.equal(a.source_rank, b.source_rank)
        assert torch.allclose(a.hidden[0][1], b.hidden[0][1].float(), atol=2e-2)
    c = back.steps[2].rank_expert_counts(1, 8, 2)
    assert c.shape == (2, 8) and int(c.sum()) == 5 * 2


def test_own_format_errors(tmp_path):
    path = str(tmp_path / "t.pt")
    save_trace(_trace(), path)
    blob = torch.load(path, weights_only=True)
    blob["version"] = 99
    torch.save(blob, path)
    with pytest.raises(TraceFormatError, match="trace version 99 is not supported"):
        load_trace(path)
    torch.save({"format": "other"}, path)
    with pytest.raises(TraceFormatError, match="format='other'.*valid: format 'megatron_probe.trace'"):
        load_trace(path)
    (tmp_path / "junk.pt").write_bytes(b"\x00\x01garbage")
    with pytest.raises(TraceFormatError, match="not a megatron_probe trace file"):
        load_trace(str(tmp_path / "junk.pt"))
    tr = _trace()
    tr.steps[0].topk_ids[0, 0, 0] = 8
    with pytest.raises(TraceFormatError, match=r"expert id 8 outside 0\.\.7"):
        tr.validate()


# ---------------------------------------------------------------------------- workloads
def _workload():
    reqs = [Request(i, arr, "python", "f", p, o, "x", "y", list(range(p)), list(range(o)))
            for i, (arr, p, o) in enumerate([(0, 100, 5), (0, 10, 1), (3, 20, 30), (3, 5, 2), (50, 7, 7)])]
    return Workload("test", "d", "s", "tok", reqs)


def test_schedule_covers_every_position_once_in_order():
    wl = _workload()
    steps = schedule_steps(wl, prefill_chunk=32, max_active=2)
    seen = {r.id: [] for r in wl.requests}
    for st in steps:
        active = {rid for rid, _, _ in st.chunks}
        assert len(active) <= 2
        for rid, s, e in st.chunks:
            r = wl.requests[rid]
            assert st.step >= r.arrival_step
            assert e - s <= 32 and (e - s == 1 or s < r.prompt_tokens)
            seen[rid] += list(range(s, e))
    for r in wl.requests:
        assert seen[r.id] == list(range(r.prompt_tokens + r.output_tokens - 1)), r.id


def test_workload_roundtrip_and_errors(tmp_path):
    wl = _workload()
    p = str(tmp_path / "w.json")
    wl.save(p)
    back = Workload.load(p)
    assert [r.prompt_ids for r in back.requests] == [r.prompt_ids for r in wl.requests]
    data = json.loads(open(p).read())
    data["requests"][0]["output_tokens"] = 0
    open(p, "w").write(json.dumps(data))
    with pytest.raises(ValueError, match="request 0 has prompt_tokens=100, output_tokens=0"):
        Workload.load(p)
    data["version"] = 7
    open(p, "w").write(json.dumps(data))
    with pytest.raises(ValueError, match="workload version 7 is not supported"):
        Workload.load(p)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_tokenizer_and_config():
    from tokenizers import Tokenizer

    from megatron_probe.experiments.tiny_moe import DEFAULT_CHECKPOINT, TinyMoEConfig

    return (Tokenizer.from_file(os.path.join(DEFAULT_CHECKPOINT, "tokenizer.json")),
            TinyMoEConfig.from_json(os.path.join(DEFAULT_CHECKPOINT, "config.json")))


def test_prefill_scenario_is_deterministic_heldout_and_fits_the_model():
    tok, cfg = _tiny_tokenizer_and_config()
    corpus = build_corpus(400_000)
    held = {d: dc.heldout for d, dc in corpus.items()}
    pr, orng = length_ranges("prefill", cfg.seq_length)
    assert pr[0] > orng[1] and pr[1] + orng[1] <= cfg.seq_length  # long prompts, short outputs, fits

    def make(seed):
        return build_workload("prefill", held, tok, seed=seed, num_requests=40, steps=8, max_len=cfg.seq_length,
                              prompt_range=pr, output_range=orng, shift_from="english", shift_to="de_fr")

    a, b = make(4), make(4)
    assert [(r.source_file, r.prompt_ids, r.output_ids, r.arrival_step, r.domain) for r in a.requests] == \
        [(r.source_file, r.prompt_ids, r.output_ids, r.arrival_step, r.domain) for r in b.requests]
    assert [r.prompt_ids for r in make(5).requests] != [r.prompt_ids for r in a.requests]
    assert a.scenario == "prefill" and a.extra["split"] == "heldout" and a.extra["shift_step"] == \
        a.requests[20].arrival_step
    for r in a.requests:
        assert is_heldout(r.source_file), r.source_file
        assert r.prompt_tokens == len(r.prompt_ids) >= pr[0] and r.output_tokens == len(r.output_ids) <= orng[1]
        assert r.prompt_tokens + r.output_tokens - 1 <= cfg.seq_length  # what the engine checks
    # the dominant domain switches at the middle request
    first, second = [r.domain for r in a.requests[:20]], [r.domain for r in a.requests[20:]]
    assert first.count("english") > 10 and second.count("de_fr") > 10
    with pytest.raises(ValueError, match="unknown scenario 'prefil'"):
        build_workload("prefil", held, tok)
    with pytest.raises(ValueError, match="domain 'latin' of the prefill scenario is not in the corpus"):
        build_workload("prefill", held, tok, shift_to="latin")
    assert "prefill" in SCENARIOS


def test_committed_prefill_workload_is_heldout_long_and_dense():
    _, cfg = _tiny_tokenizer_and_config()
    wl = Workload.load(os.path.join(ROOT, "workloads", "prefill.json"))
    assert wl.scenario == "prefill" and wl.extra["split"] == "heldout"
    for r in wl.requests:
        assert is_heldout(r.source_file), r.source_file
        assert len(r.prompt_ids) == r.prompt_tokens and len(r.output_ids) == r.output_tokens
        assert r.prompt_tokens + r.output_tokens - 1 <= cfg.seq_length
    # served with 64-token chunks and 256 requests at once (docs/serving.md), its arrival phase
    # gives every one of 2 EP ranks more than 1024 tokens a step
    steps = schedule_steps(wl, prefill_chunk=64, max_active=256)
    per_rank = [min(sum(e - s for rid, s, e in st.chunks if rid % 2 == k) for k in range(2)) for st in steps[3:48]]
    assert min(per_rank) >= 1024, per_rank


def test_make_workloads_rejects_an_unknown_scenario():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_workloads.py"), "--scenarios", "nope",
                          "--out", "/nonexistent"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown scenario 'nope'" in out.stderr


# ---------------------------------------------------------------------------- generator
def test_generator_counts_are_labelled_and_consistent():
    heat = torch.tensor([[100, 50, 10, 5, 1, 1, 1, 1], [10, 10, 10, 10, 10, 10, 10, 10]])
    ct = generate_counts(heat, topk=2, steps=30, tokens_per_step=64, ep=2, requests_per_step=8, alpha=0.5,
                         request_steps=2, shift_step=15, seed=1)  # fast turnover: new requests see the shift
    assert ct.generated and "GENERATED" in ct.method
    assert ct.counts.shape == (30, 2, 2, 8)
    assert (ct.counts.sum(dim=(2, 3)) == 64 * 2).all()
    before = ct.counts[:15, 0].sum(dim=(0, 1)).double()
    after = ct.counts[15:, 0].sum(dim=(0, 1)).double()
    assert int(before.argmax()) == 0 and int(after.argmax()) != 0  # the hot expert moved
    with pytest.raises(ValueError, match="multiple of ep=3"):
        generate_counts(heat, 2, 2, 64, ep=3, requests_per_step=8)
    with pytest.raises(ValueError, match="non-negative"):
        generate_counts(-heat, 2, 2, 64, ep=2, requests_per_step=8)


@pytest.mark.skipif(len(SHARED) < 4, reason="../shared/traces not present")
def test_alpha_fit_from_real_request():
    per_token = load_any([f for f in SHARED if "qwen3-30b-a3b.route" in f][0])
    agg = load_any([f for f in SHARED if "coactivation_qwen3-30b" in f][0])
    target = observed_request_skew(per_token)
    assert 10 < target < 14  # the README's 11.9
    a = fit_alpha(agg.heat[:6], per_token.topk, per_token.n_tokens, target)
    assert 0.01 <= a <= 100
