"""Command line: ``python -m analysis {eval,profile,sensitivity} ...``."""
from __future__ import annotations

import argparse
import sys
import time

from analysis.cli import progress_stderr, require_at_least_one, run_command, say


def cmd_eval(a: argparse.Namespace) -> dict:
    from analysis.data import load_corpus, tokenize, windows
    from analysis.loading import load_model
    from analysis.metrics import latency, model_bytes, perplexity, reset_cuda_peak

    latency_flags = () if a.no_latency else (("--latency-runs", a.latency_runs), ("--latency-seqlen", a.latency_seqlen))
    require_at_least_one(("--seqlen", a.seqlen), ("--windows", a.windows), *latency_flags,
                         hints={"--windows": " (leave it out to evaluate every window)"})
    if a.seqlen < 2:
        raise ValueError(f"--seqlen must be at least 2 (perplexity predicts each token from those before it), "
                         f"got {a.seqlen}")
    corpus = load_corpus(a.text)  # a missing text file is said before the model loads
    lm = load_model(a.model, a.device, a.dtype, trust_remote_code=a.trust_remote_code, progress=say)
    lm.check_seqlen(a.seqlen)
    ids = windows(tokenize(lm.tokenizer, corpus), a.seqlen, a.windows)
    reset_cuda_peak(lm.device)  # the peak reported is the evaluation's (weights included)
    t = time.perf_counter()
    ppl = perplexity(lm.model, ids, corpus.label, progress=progress_stderr)
    ppl_s = time.perf_counter() - t
    mem = model_bytes(lm.model)
    out = dict(model=a.model, source=lm.source, fingerprint=lm.fingerprint, ppl=ppl.ppl, nll=ppl.nll,
               tokens=ppl.tokens, seqlen=a.seqlen, windows=ids.shape[0], data=corpus.label,
               weight_bytes=mem.weight_bytes, peak_allocated=mem.peak_allocated, device=str(lm.device),
               dtype=str(lm.dtype).replace("torch.", ""), eval_seconds=round(ppl_s, 2))
    if not a.no_latency:
        lat = latency(lm.model, seqlen=min(a.latency_seqlen or a.seqlen, a.seqlen), runs=a.latency_runs)
        out.update(prefill_tok_s=lat.prefill_tok_s, decode_ms_per_token=lat.decode_ms_per_token,
                   decode_ms_range=[round(x, 3) for x in lat.decode_range], latency_seqlen=lat.seqlen,
                   latency_runs=lat.runs, **({"latency_note": lat.note} if lat.note else {}))
        if unsteady := lat.unsteady_note():
            say(f"warning: {unsteady}")
            out["latency_warning"] = unsteady
    else:
        out.update(prefill_tok_s=None, decode_ms_per_token=None)
    return out


def cmd_profile(a: argparse.Namespace) -> dict:
    from pathlib import Path

    from analysis.atomic import check_replaceable
    from analysis.data import calibration_windows, load_corpus, tokenize
    from analysis.loading import load_model
    from analysis.profile import PROFILE_MARKERS, profile_model

    check_replaceable(a.out, PROFILE_MARKERS, "a profile")  # before the long work
    require_at_least_one(("--tokens", a.tokens), ("--seqlen", a.seqlen), ("--batch-size", a.batch_size))
    corpus = load_corpus(a.text)  # a missing text file is said before the model loads
    lm = load_model(a.model, a.device, a.dtype, trust_remote_code=a.trust_remote_code, progress=say)
    lm.require_dense("profiling")
    lm.check_seqlen(a.seqlen)
    n_win = max(1, -(-a.tokens // a.seqlen))
    ids = calibration_windows(tokenize(lm.tokenizer, corpus), a.seqlen, n_win, a.seed)
    say(f"profiling {ids.numel()} tokens ({n_win} x {a.seqlen}) of {corpus.label} on {lm.device}")
    prof = profile_model(lm.model, lm.adapter, ids, fingerprint=lm.fingerprint, data_label=corpus.label,
                         data_digest=f"{corpus.digest}-{a.seqlen}-{a.seed}", batch_size=a.batch_size,
                         layerwise=a.layerwise, progress=progress_stderr)
    prof.save(Path(a.out))
    return dict(out=a.out, linears=len(prof.linears), **{k: prof.meta[k] for k in
                                                         ("n_tokens", "seconds_stats", "seconds_eig", "device")})


def cmd_sensitivity(a: argparse.Namespace) -> dict:
    from analysis.sensitivity import cli_sensitivity

    return cli_sensitivity(a, progress=progress_stderr, say=say)


def main(argv: list[str] | None = None) -> int:
    from analysis import sensitivity as sens  # its defaults are the CLI's

    p = argparse.ArgumentParser(prog="python -m analysis", description="RankLab analysis: evaluate and profile models")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp):
        sp.add_argument("--model", default="default", help="default | model id | folder | file.gguf")
        sp.add_argument("--text", default="default", help="default | PATH | wikitext2:PATH")
        sp.add_argument("--device", default="auto", help="auto | cpu | cuda")
        sp.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
        sp.add_argument("--trust-remote-code", action="store_true")
        sp.add_argument("--json", action="store_true",
                        help="compact JSON on stdout (one line; without it the JSON is indented)")

    e = sub.add_parser("eval", help="perplexity, bytes and latency of a model")
    common(e)
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--windows", type=int, default=None, help="first N windows (default: all)")
    e.add_argument("--no-latency", action="store_true")
    e.add_argument("--latency-seqlen", type=int, default=None)
    e.add_argument("--latency-runs", type=int, default=3)
    e.set_defaults(fn=cmd_eval)

    pr = sub.add_parser("profile", help="activation and weight spectra of every decoder linear")
    common(pr)
    pr.add_argument("--tokens", type=int, default=16384)
    pr.add_argument("--seqlen", type=int, default=2048)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--batch-size", type=int, default=4)
    pr.add_argument("--layerwise", action="store_true", help="one decoder layer at a time (low memory)")
    pr.add_argument("--out", required=True, help="folder to write (new, empty, or an earlier profile)")
    pr.set_defaults(fn=cmd_profile)

    s = sub.add_parser("sensitivity", help="per-linear loss increase on a grid of ranks and bits")
    common(s)
    s.add_argument("--tokens", type=int, default=sens.DEFAULT_TOKENS,
                   help="probe tokens (cost is linear in them; the grid is ~1470 settings on 135M, the 8-bit ones "
                        "derived from the 4-bit probes unless --derive-bits says otherwise)")
    s.add_argument("--seqlen", type=int, default=sens.DEFAULT_SEQLEN)
    s.add_argument("--profile-tokens", type=int, default=sens.PROFILE_TOKENS,
                   help="tokens of the profile that fits svd-llm/gptq/vq")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--method", default="svd-llm", help="low-rank method probed: svd | act-pca | svd-llm (default)")
    s.add_argument("--quant", default="rtn", help="quantiser probed: rtn | gptq | vq (2/2.5/3/4 bits)")
    s.add_argument("--group-size", type=int, default=128)
    s.add_argument("--derive-bits", default=",".join(map(str, sens.DERIVED_BITS)),
                   help="bit widths scaled from the next lower probed width instead of probed "
                        "('' probes every setting)")
    s.add_argument("--workers", type=int, default=None,
                   help="parallel probe workers (default: one per CPU thread, one on a GPU)")
    s.add_argument("--out", required=True, help="folder to write (new, empty, or an earlier grid)")
    s.set_defaults(fn=cmd_sensitivity)

    a = p.parse_args(argv)
    return run_command(a, indent=None if a.json else 2)

if __name__ == "__main__":
    sys.exit(main())
