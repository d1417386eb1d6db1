"""The command lines, end to end on a tiny model folder with a real (character-level) tokenizer."""
import json

import pandas as pd
import pytest

from tests.conftest import tiny_folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("tiny"))


def _run(main, argv, capsys) -> dict:
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _assert_reloads(saved, text, comp: dict, capsys) -> None:
    """The saved compressed model evaluates, holding the bytes its apply reported."""
    from analysis.__main__ import main as analysis_main

    again = _run(analysis_main, ["eval", "--model", str(saved), "--text", str(text), "--seqlen", "32",
                                 "--windows", "4", "--json", "--no-latency"], capsys)
    assert again["weight_bytes"] == comp["weight_bytes"] and again["ppl"] > 1


def test_eval_profile_apply_reload(model_dir, tmp_path, capsys, monkeypatch):
    from analysis.__main__ import main as analysis_main
    from compression.__main__ import main as compression_main

    monkeypatch.setenv("RANKLAB_CACHE", str(tmp_path / "cache"))
    folder, text = model_dir
    out = _run(analysis_main, ["eval", "--model", str(folder), "--text", str(text), "--seqlen", "32",
                               "--windows", "4", "--json", "--latency-runs", "1", "--latency-seqlen", "16"], capsys)
    for key in ("model", "ppl", "tokens", "seqlen", "windows", "weight_bytes", "prefill_tok_s",
                "decode_ms_per_token", "device"):
        assert key in out
    assert out["windows"] == 4 and out["tokens"] == 4 * 31 and out["ppl"] > 1
    assert "latency_note" not in out  # plain modules: the timings need no caveat

    _run(analysis_main, ["profile", "--model", str(folder), "--text", str(text), "--tokens", "512", "--seqlen", "32",
                         "--out", str(tmp_path / "prof")], capsys)
    summary = pd.read_csv(tmp_path / "prof" / "summary.csv")
    assert {"name", "layer", "role", "out_features", "in_features", "eff_rank_act", "eff_rank_weight", "rank90",
            "rank95", "rank99", "break_even"} <= set(summary.columns)
    assert (tmp_path / "prof" / "meta.json").exists()
    assert compression_main(["allocate", "--model", str(folder), "--sensitivity", str(tmp_path / "prof"),
                             "--target-ratio", "0.5", "--out", str(tmp_path / "p.json")]) == 2
    assert "holds a profile (spectra), not a sensitivity grid" in capsys.readouterr().err

    comp = _run(compression_main, ["apply", "--model", str(folder), "--text", str(text), "--method", "gptq",
                                   "--bits", "4", "--group-size", "32", "--calib-tokens", "256", "--seqlen", "32",
                                   "--out", str(tmp_path / "c")], capsys)
    assert {"method", "weight_bytes", "dense_weight_bytes", "bits_per_weight", "seconds"} <= set(comp)
    assert comp["weight_bytes"] == comp["predicted_weight_bytes"] < comp["dense_weight_bytes"]
    assert comp["bits_per_weight"] == pytest.approx(4 + 32 / 32)
    _assert_reloads(tmp_path / "c", text, comp, capsys)
    # a compressed folder evaluates, but is refused for the work that needs dense weights, naming its base model
    for main, argv in ((analysis_main, ["profile", "--out", str(tmp_path / "p2")]),
                       (analysis_main, ["sensitivity", "--tokens", "64", "--out", str(tmp_path / "s2")]),
                       (compression_main, ["apply", "--method", "rtn", "--bits", "4", "--out", str(tmp_path / "c2")])):
        assert main([argv[0], "--model", str(tmp_path / "c"), "--text", str(text), *argv[1:]]) == 2
        err = capsys.readouterr().err
        assert "already compressed" in err and f"load its base model `{folder}` instead" in err, err
        assert not (tmp_path / argv[-1]).exists()
    timed = _run(analysis_main, ["eval", "--model", str(tmp_path / "c"), "--text", str(text), "--seqlen", "32",
                                 "--windows", "1", "--json", "--latency-runs", "1", "--latency-seqlen", "16"], capsys)
    n_linears = len(pd.read_csv(tmp_path / "prof" / "summary.csv"))
    assert timed["latency_note"].startswith(f"{n_linears} quantised weight matrices are unpacked and dequantised")


def test_apply_vq_keeps_its_predicted_bytes_and_reloads(model_dir, tmp_path, capsys, monkeypatch):
    from compression.__main__ import main as compression_main

    monkeypatch.setenv("RANKLAB_CACHE", str(tmp_path / "cache"))
    folder, text = model_dir
    comp = _run(compression_main, ["apply", "--model", str(folder), "--text", str(text), "--method", "vq",
                                   "--bits", "2", "--group-size", "32", "--calib-tokens", "256", "--seqlen", "32",
                                   "--out", str(tmp_path / "c")], capsys)
    assert comp["weight_bytes"] == comp["predicted_weight_bytes"] < comp["dense_weight_bytes"]
    _assert_reloads(tmp_path / "c", text, comp, capsys)


def test_apply_lillama_defaults_to_svd_llm_and_reports_its_options(model_dir, tmp_path, capsys, monkeypatch):
    from compression.__main__ import main as compression_main

    monkeypatch.setenv("RANKLAB_CACHE", str(tmp_path / "cache"))
    folder, text = model_dir
    comp = _run(compression_main, ["apply", "--model", str(folder), "--text", str(text), "--method", "lillama",
                                   "--param-ratio", "0.8", "--steps", "3", "--granularity", "mlp",
                                   "--calib-tokens", "256", "--seqlen", "32", "--out", str(tmp_path / "l")], capsys)
    lil = comp["lillama"]
    assert (lil["init"], lil["granularity"], lil["steps"], lil["order"]) == ("svd-llm", "mlp", 3, "bottom-first")
    assert lil["init_loss"] > 0 and lil["final_loss"] > 0
    assert comp["weight_bytes"] == comp["predicted_weight_bytes"] < comp["dense_weight_bytes"]
    assert lil["calib_tokens"] == 256 and lil["tokens_used"] == 256
    saved = json.loads((tmp_path / "l" / "ranklab.json").read_text())
    assert saved["plan"]["lillama"]["init"] == "svd-llm"
    _assert_reloads(tmp_path / "l", text, comp, capsys)
    # a hand-written plan naming lillama modules without options: the defaults, and the tokens really used
    for options in ({}, None):
        plan = {"version": 1, "modules": {"model.layers.0.mlp.up_proj": {"rank": 16, "lowrank": "lillama"}}}
        if options is not None:
            plan["lillama"] = options
        (tmp_path / "lil.json").write_text(json.dumps(plan))
        comp = _run(compression_main, ["apply", "--model", str(folder), "--text", str(text), "--plan",
                                       str(tmp_path / "lil.json"), "--calib-tokens", "256", "--seqlen", "32",
                                       "--out", str(tmp_path / "l2")], capsys)
        assert comp["lillama"]["init"] == "svd" and comp["lillama"]["calib_tokens"] == 8192  # the plan's defaults
        assert comp["lillama"]["tokens_used"] == 256 and comp["lillama"]["final_loss"] > 0


def test_apply_with_tuning_reports_it_and_refuses_conflicting_flags(model_dir, tmp_path, capsys, monkeypatch):
    from compression.__main__ import main as compression_main

    monkeypatch.setenv("RANKLAB_CACHE", str(tmp_path / "cache"))
    folder, text = model_dir
    common = ["apply", "--model", str(folder), "--text", str(text), "--calib-tokens", "256", "--seqlen", "32"]
    comp = _run(compression_main, [*common, "--method", "rtn", "--bits", "2", "--group-size", "32",
                                   "--tune-steps", "5", "--out", str(tmp_path / "t")], capsys)
    tuned = comp["tune"]
    assert (tuned["steps"], tuned["lr"], tuned["tokens_used"], tuned["layers_tuned"]) == (5, 1e-2, 256, 2)
    assert all(after <= before for before, after in tuned["output_error"].values())
    assert comp["calibration"] != "none (data-free methods)"  # rtn is data-free, tuning is not
    assert not (tmp_path / "cache" / "profiles").exists()  # but it needs windows only, no profile
    assert comp["weight_bytes"] == comp["predicted_weight_bytes"]
    saved = json.loads((tmp_path / "t" / "ranklab.json").read_text())
    assert saved["plan"]["tune"]["steps"] == 5
    _assert_reloads(tmp_path / "t", text, comp, capsys)
    (tmp_path / "tp.json").write_text(json.dumps({"version": 1, "default": {"bits": 4, "group_size": 32},
                                                  "modules": {}, "tune": {"steps": 2}}))
    for flags, msg in ((["--method", "rtn", "--bits", "2", "--tune-lr", "0.1"], "--tune-lr is read only with"),
                       (["--method", "rtn", "--bits", "2", "--tune-steps", "-1"], "--tune-steps must be >= 0"),
                       (["--method", "slicegpt", "--slice", "0.1", "--tune-steps", "3"], "slicegpt has none"),
                       (["--plan", str(tmp_path / "tp.json"), "--tune-steps", "3"], "carries its own 'tune' options"),
                       (["--model", str(tmp_path / "missing"), "--plan", str(tmp_path / "tp.json"), "--tune-steps",
                         "3"], "carries its own 'tune' options")):  # said before the (missing) model loads
        assert compression_main([*common, "--out", str(tmp_path / "o"), *flags]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_data_free_apply_reads_no_calibration_and_refuses_ignored_flags(model_dir, tmp_path, capsys, monkeypatch):
    from analysis.__main__ import main as analysis_main
    from compression.__main__ import main as compression_main

    monkeypatch.setenv("RANKLAB_CACHE", str(tmp_path / "cache"))
    folder, text = model_dir
    out = _run(compression_main, ["apply", "--model", str(folder), "--text", str(text), "--method", "rtn", "--bits",
                                  "4", "--group-size", "32", "--out", str(tmp_path / "rtn")], capsys)
    assert out["calibration"] == "none (data-free methods)" and out["weight_bytes"] == out["predicted_weight_bytes"]
    assert not (tmp_path / "cache" / "profiles").exists()  # nothing was profiled
    latin = tmp_path / "latin.txt"  # a data-free method reads no text, so one it could not read is no obstacle
    latin.write_bytes("café".encode("latin-1"))
    assert compression_main(["apply", "--model", str(folder), "--text", str(latin), "--method", "rtn", "--bits", "4",
                             "--group-size", "32", "--out", str(tmp_path / "rtn2")]) == 0
    # a plan made for another model applies (names and shapes fit) with a note saying so
    from compression.plan import ModuleSpec, Plan

    Plan(default=ModuleSpec(bits=4, group_size=32), meta={"base_model": "other", "base_fingerprint": "f00d"}).save(
        tmp_path / "foreign.json")
    assert compression_main(["apply", "--model", str(folder), "--plan", str(tmp_path / "foreign.json"), "--out",
                             str(tmp_path / "foreign")]) == 0
    err = capsys.readouterr().err
    assert "note: this plan was made for another model (`other`), fingerprint f00d, not this one" in err
    for flags, msg in ((["--method", "rtn", "--bits", "4", "--param-ratio", "0.5"], "--param-ratio would be ignored"),
                       (["--method", "svd-llm", "--param-ratio", "0.8", "--bits", "4"], "--bits would be ignored"),
                       (["--method", "svd", "--param-ratio", "0.8", "--steps", "5"], "--steps would be ignored"),
                       (["--method", "fp8", "--group-size", "64"], "--group-size would be ignored"),
                       (["--plan", str(tmp_path / "p.json"), "--bits", "4"], "--bits would be ignored: the plan"),
                       (["--plan", str(tmp_path / "p.json"), "--method", "rtn"], "either --plan"),
                       (["--method", "nope"], "unknown method 'nope'")):
        assert compression_main(["apply", "--model", str(folder), "--out", str(tmp_path / "o"), *flags]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # checked before the model loads (a missing model is only reported once the flags pass)
    missing = ["--model", "org/missing-model", "--out", str(tmp_path / "o")]
    for main, cmd in ((analysis_main, "eval"), (analysis_main, "profile"), (analysis_main, "sensitivity"),
                      (compression_main, "apply")):  # a missing text file, before the (missing) model
        extra = {"apply": ["--method", "rtn", "--bits", "4"], "eval": []}.get(cmd, [])
        extra += [] if cmd == "eval" else ["--out", str(tmp_path / "o")]
        assert main([cmd, *missing[:2], "--text", str(tmp_path / "nope.txt"), *extra]) == 2
        assert "nope.txt" in capsys.readouterr().err, cmd
    for flags, msg in ((["--method", "binary", "--bits", "1"], "not on disk"),  # the format's own width: fine
                       (["--method", "binary", "--bits", "2"], "--bits would be ignored"),
                       (["--method", "svd-llm"], "give --param-ratio"),
                       (["--method", "gptq"], "gptq needs --bits"),
                       (["--method", "slicegpt"], "slicegpt needs --slice"),
                       ([], "give --plan PLAN.json or --method NAME"),
                       (["--method", "rtn", "--bits", "4", "--seqlen", "0"], "--seqlen must be at least 1"),
                       (["--method", "svd-llm", "--param-ratio", "0"], "--param-ratio 0.0 must be in (0, 1]"),
                       (["--method", "rtn", "--bits", "5"], "--bits 5: rtn takes 2, 3, 4 or 8 bits"),
                       (["--method", "vq", "--bits", "8"], "--bits 8: vq takes 2, 2.5, 3 or 4 bits"),
                       (["--method", "gptq", "--bits", "4", "--group-size", "0"], "--group-size 0 must be a positive"),
                       (["--method", "svd", "--param-ratio", "nan"], "--param-ratio nan must be in (0, 1]"),
                       (["--method", "rtn", "--bits", "4", "--seqlen", "1"], "--seqlen 1 is too short"),
                       (["--method", "slicegpt", "--slice", "1.0"], "--slice 1.0 must be in [0, 1)"),
                       (["--method", "lillama", "--param-ratio", "0.5", "--lr", "-1"], "lillama: lr must be > 0"),
                       (["--method", "lillama", "--param-ratio", "0.5", "--granularity", "block"],
                        "lillama: granularity 'block' is not one of")):
        assert compression_main(["apply", *missing, *flags]) == 2
        assert msg in capsys.readouterr().err, flags
    bad_plan = tmp_path / "bad-lillama.json"
    bad_plan.write_text(json.dumps({"version": 1, "lillama": {"steps": -2}}))
    assert compression_main(["apply", *missing, "--plan", str(bad_plan)]) == 2
    assert "bad-lillama.json: lillama: steps must be >= 0" in capsys.readouterr().err


def test_bad_input_is_one_clear_line(model_dir, tmp_path, capsys):
    from analysis.__main__ import main as analysis_main
    from compression.__main__ import main as compression_main

    folder, text = model_dir
    assert analysis_main(["eval", "--model", "org/missing-model", "--no-latency"]) == 2
    assert "not on disk" in capsys.readouterr().err
    too_long = ["--model", str(folder), "--text", str(text), "--seqlen", "300"]  # the tiny model has 256 positions
    for main, argv in ((analysis_main, ["eval", *too_long]), (analysis_main, ["profile", *too_long, "--out", str(
            tmp_path / "p")]), (compression_main, ["apply", *too_long, "--method", "gptq", "--bits", "4",
                                                   "--out", str(tmp_path / "c")])):
        assert main(argv) == 2
        assert "seqlen 300 exceeds the model's maximum of 256 positions" in capsys.readouterr().err, argv[0]
    assert not (tmp_path / "p").exists() and not (tmp_path / "c").exists()
    assert analysis_main(["eval", "--model", "org/missing-model", "--seqlen", "1"]) == 2  # before the model loads
    assert "--seqlen must be at least 2 (perplexity predicts each token" in capsys.readouterr().err
    (tmp_path / "bits5.json").write_text(json.dumps({"version": 1, "default": {"bits": 5}, "modules": {}}))
    assert compression_main(["apply", "--model", "org/missing-model", "--plan", str(tmp_path / "bits5.json"),
                             "--out", str(tmp_path / "c")]) == 2  # a plan wrong on any model: before it loads
    assert "default: rtn: 5 bits is not supported; use one of [2, 3, 4, 8]" in capsys.readouterr().err
    for flag in ("--windows", "--latency-runs"):
        assert analysis_main(["eval", "--model", str(folder), flag, "0"]) == 2
        assert f"{flag} must be at least 1, got 0" in capsys.readouterr().err
    assert analysis_main(["eval", "--model", "org/missing-model", "--no-latency", "--latency-runs", "0"]) == 2
    assert "not on disk" in capsys.readouterr().err  # latency flags unchecked when latency is off
    assert analysis_main(["profile", "--model", str(folder), "--seqlen", "0", "--out", str(tmp_path / "p")]) == 2
    assert "--seqlen must be at least 1, got 0" in capsys.readouterr().err
    for flags, msg in ((["--method", "lillama"], "probes one of svd, act-pca, svd-llm (lillama plans use"),
                       (["--quant", "fp8"], "--quant 'fp8': probes one of rtn, gptq"),
                       (["--derive-bits", "x"], "--derive-bits 'x'"),
                       (["--derive-bits", "5"], "derived widths are among 3, 4, 8"),
                       (["--workers", "0"], "--workers must be at least 1, got 0"),
                       (["--profile-tokens", "-3"], "--profile-tokens must be at least 1, got -3"),
                       (["--group-size", "0"], "--group-size must be at least 1, got 0")):
        assert analysis_main(["sensitivity", "--model", str(folder), "--out", str(tmp_path / "s"), *flags]) == 2
        assert msg in capsys.readouterr().err
    for flag in ("--target-bits", "--target-ratio", "--target-bytes"):  # refused before anything loads
        for bad in (("inf", "-5") if flag != "--target-bytes" else ("-5", "0")):
            assert compression_main(["allocate", "--model", "org/missing-model", "--sensitivity", str(tmp_path / "no"),
                                     flag, bad, "--out", str(tmp_path / "p.json")]) == 2
            assert f"({flag}) must be a finite positive number" in capsys.readouterr().err
    assert compression_main(["apply", "--model", str(folder), "--text", str(text), "--method", "svd-llm",
                             "--out", str(tmp_path / "x")]) == 2
    assert "--param-ratio" in capsys.readouterr().err
    # an --out folder that holds someone's files is refused before any work, its files intact
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert compression_main(["apply", "--model", str(folder), "--method", "rtn", "--bits", "4",
                             "--out", str(mine)]) == 2
    assert "not empty and does not hold a compressed model" in capsys.readouterr().err
    for argv in (["profile", "--model", str(folder), "--out", str(mine)],
                 ["sensitivity", "--model", str(folder), "--out", str(mine)]):
        assert analysis_main(argv) == 2
        assert "not empty and does not hold a" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_warnings_are_one_line_each_and_errors_one_line(capsys):
    import argparse
    import warnings

    from analysis.cli import run_command

    def fn(_a):
        warnings.warn("only 3 tokens: the spectra are noisy", UserWarning, stacklevel=1)
        return {"ok": 1}

    assert run_command(argparse.Namespace(fn=fn)) == 0
    err = capsys.readouterr().err
    assert err == "warning: only 3 tokens: the spectra are noisy\n"  # no file name, no source line
    assert warnings.showwarning is not None and warnings.showwarning.__name__ != "_warning_line"  # restored

    def interrupted(_a):
        raise KeyboardInterrupt

    assert run_command(argparse.Namespace(fn=interrupted)) == 130  # Ctrl-C: one line, no traceback
    assert capsys.readouterr().err == ("interrupted: outputs are written whole or not at all, so nothing "
                                       "half-written is left\n")
