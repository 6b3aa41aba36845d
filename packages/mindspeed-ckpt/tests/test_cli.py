"""`mindspeed convert` exit codes and one-line errors, through main(argv), `python -m` and the
`mindspeed` console script."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mindspeed_ckpt.cli import main
from mindspeed_ckpt.hf_io import HFReader, save_hf


def _err_line(capsys):
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_round_trip_through_main(make_hf, tmp_path, capsys):
    hf, cfg, t = make_hf("qwen3")
    assert main(["hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "mc"), "--tp", "2", "--pp", "2"]) == 0
    assert main(["mcore-to-hf", "--mcore-dir", str(tmp_path / "mc"), "--out", str(tmp_path / "back")]) == 0
    r = HFReader(tmp_path / "back")
    assert set(r.names) == set(t) and all(torch.equal(r.get(n), t[n]) for n in t)
    # transformers' spelling of the shard limit: several shards plus the index
    assert main(["mcore-to-hf", "--mcore-dir", str(tmp_path / "mc"), "--out", str(tmp_path / "sharded"),
                 "--max-shard-size", "20KB"]) == 0  # fmt: skip
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    r = HFReader(tmp_path / "sharded")
    assert set(r.names) == set(t) and all(torch.equal(r.get(n), t[n]) for n in t)
    # published with the modes of a plain mkdir/open under the umask, not the private staging modes
    mask = os.umask(0)
    os.umask(mask)
    for path in [tmp_path / "back", *(tmp_path / "back").rglob("*"), tmp_path / "mc", *(tmp_path / "mc").rglob("*")]:
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~mask, path


@pytest.mark.parametrize("argv,needle", [
    (["hf-to-mcore", "--hf-dir", "{tmp}/nope", "--out", "{tmp}/mc"], "nope"),
    (["hf-to-mcore", "--hf-dir", "{hf}", "--out", "{tmp}/mc", "--tp", "3"], "num_attention_heads=4"),
    (["hf-to-mcore", "--hf-dir", "{hf}", "--out", "{tmp}/mc", "--tp", "4"], "num_key_value_heads=2"),
    (["hf-to-mcore", "--hf-dir", "{hf}", "--out", "{tmp}/mc", "--pp", "3"], "--pp 3"),
    (["hf-to-mcore", "--hf-dir", "{hf}", "--out", "{tmp}/mc", "--dtype", "fp8"], "--dtype"),
    (["hf-to-mcore", "--hf-dir", "{hf}"], "--out"),
    (["mcore-to-hf", "--mcore-dir", "{hf}", "--out", "{tmp}/back"], "latest_checkpointed_iteration.txt"),
    (["frobnicate"], "frobnicate"),
])
def test_bad_input_exits_2_with_one_line(make_hf, tmp_path, capsys, argv, needle):
    hf, _, _ = make_hf("llama")
    argv = [a.format(tmp=tmp_path, hf=hf) for a in argv]
    assert main(argv) == 2
    assert needle in _err_line(capsys)
    assert not (tmp_path / "mc").exists() and not (tmp_path / "back").exists()


def test_existing_out_needs_overwrite(make_hf, tmp_path, capsys):
    hf, _, _ = make_hf("llama")
    (tmp_path / "mc").mkdir()
    assert main(["hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "mc")]) == 2
    assert "--overwrite" in _err_line(capsys)
    assert main(["hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "mc"), "--overwrite"]) == 0


def test_corrupt_and_missing_files_name_the_file(make_hf, tmp_path, capsys):
    hf, _, _ = make_hf("llama")
    assert main(["hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "mc"), "--tp", "2"]) == 0
    capsys.readouterr()
    rank1 = tmp_path / "mc" / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt"
    rank1.write_bytes(b"not a checkpoint")
    assert main(["mcore-to-hf", "--mcore-dir", str(tmp_path / "mc"), "--out", str(tmp_path / "back")]) == 2
    assert "mp_rank_01" in _err_line(capsys)
    shutil.rmtree(rank1.parent)
    assert main(["mcore-to-hf", "--mcore-dir", str(tmp_path / "mc"), "--out", str(tmp_path / "back")]) == 2
    assert "tensor_model_parallel_size=2" in _err_line(capsys)  # saved args say TP=2; a lone rank 0 is refused
    (hf / "config.json").unlink()
    assert main(["hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "mc2")]) == 2
    assert "config.json" in _err_line(capsys)


def test_missing_tensor(make_hf, tmp_path, capsys):
    hf, cfg, t = make_hf("llama")
    del t["model.layers.1.mlp.up_proj.weight"]
    save_hf(tmp_path / "partial", cfg, t)
    assert main(["hf-to-mcore", "--hf-dir", str(tmp_path / "partial"), "--out", str(tmp_path / "mc")]) == 2
    assert "model.layers.1.mlp.up_proj.weight" in _err_line(capsys)


@pytest.mark.parametrize("flags,needle", [
    (["--ep", "3"], "--ep 3"),  # 4 experts
    (["--ep", "2", "--etp", "2"], "--etp"),
    (["--pp", "2", "--num-layer-list", "1,2"], "--num-layer-list 1,2"),
    (["--pp", "2", "--num-layer-list", "a,b"], "--num-layer-list"),
    (["--pp", "2", "--vpp", "2"], "--vpp 2"),  # 2 layers cannot make 4 chunks
    (["--pp", "2", "--decoder-first-pipeline-num-layers", "3"], "--decoder-first/last"),
])
def test_bad_parallel_flags_exit_2(make_hf, tmp_path, capsys, flags, needle):
    hf, _, _ = make_hf("mixtral")
    assert main(["hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "mc"), *flags]) == 2
    assert needle in _err_line(capsys)
    assert not (tmp_path / "mc").exists()


def test_dense_model_refuses_ep(make_hf, tmp_path, capsys):
    hf, _, _ = make_hf("llama")
    assert main(["hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "mc"), "--ep", "2"]) == 2
    assert "--ep 2" in _err_line(capsys)


def test_mtp_missing_from_a_transformers_checkpoint_says_how_to_fix(make_hf, tmp_path, capsys):
    hf, cfg, t = make_hf("deepseek_v3")
    save_hf(tmp_path / "nomtp", cfg, {k: v for k, v in t.items() if not k.startswith("model.layers.3.")})
    assert main(["hf-to-mcore", "--hf-dir", str(tmp_path / "nomtp"), "--out", str(tmp_path / "mc")]) == 2
    assert "num_nextn_predict_layers" in _err_line(capsys)


def test_progress_line_on_request(make_hf, tmp_path, capsys):
    hf, _, _ = make_hf("qwen3_moe")
    assert main(["hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "mc"), "--ep", "2", "--progress"]) == 0
    err = capsys.readouterr().err
    assert "hf-to-mcore:" in err and "tensors" in err and "ETA" in err and err.endswith("\n")
    assert main(["mcore-to-hf", "--mcore-dir", str(tmp_path / "mc"), "--out", str(tmp_path / "back")]) == 0
    assert capsys.readouterr().err == ""  # not a tty, not asked


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "hf-to-mcore" in capsys.readouterr().out


def _run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_python_dash_m_and_console_script(make_hf, tmp_path):
    pytest.importorskip("mindspeed_cli")
    hf, _, t = make_hf("qwen2")
    p = _run([sys.executable, "-m", "mindspeed_ckpt.cli", "hf-to-mcore", "--hf-dir", str(hf), "--out", str(tmp_path / "mc"),
              "--tp", "2"])
    assert p.returncode == 0, p.stderr
    script = Path(sys.executable).with_name("mindspeed")
    if not script.exists():
        pytest.skip("no mindspeed console script next to this interpreter")
    p = _run([str(script), "convert", "mcore-to-hf", "--mcore-dir", str(tmp_path / "mc"), "--out", str(tmp_path / "back")])
    assert p.returncode == 0, p.stderr
    r = HFReader(tmp_path / "back")
    assert set(r.names) == set(t)
    p = _run([str(script), "convert", "mcore-to-hf", "--mcore-dir", str(tmp_path / "mc"), "--out", str(tmp_path / "back")])
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--overwrite" in p.stderr


def test_max_shard_size_spellings():
    from mindspeed_ckpt.cli import UsageError, parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("500mb") == 500 * 10**6
    assert parse_size("1234") == 1234 and parse_size("1.5KB") == 1500
    for bad in ("", "GB", "5XB", "0", "-1GB"):
        with pytest.raises(UsageError, match="--max-shard-size"):
            parse_size(bad)
