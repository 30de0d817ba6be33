"""Every mode on an imported Hugging Face model, through the CLI (in-process): `init_from=hf:DIR`.

eval (perplexity and bits per byte in the model's tokens), generate, ptq gptq and a few qat
steps on each tiny model, then finetune, verify, upgrade and export of the checkpoints they
write; provenance travels into them; an unsupported config exits 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qtrain.cli import main
from tests.conftest import SHARED_DATA
from tests.hf_models import MODELS, make

pytestmark = pytest.mark.integration

DATA = [
    "data=text", f"data.path={SHARED_DATA}", "data.val_windows=2", "train.batch_size=2", "eval.decode_tokens=0",
    "eval.prefill_tokens=0", "model.block_size=32",
]  # fmt: skip
STEPS = ["train.max_steps=3", "train.warmup_steps=1", "train.eval_every=0", "train.save_every=0"]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("transformers", reason="transformers builds the models to import (test-only dependency)")
    root = tmp_path_factory.mktemp("hf")
    for name in MODELS:
        make(name, root / name)
    return {name: root / name for name in MODELS}


def _run(args: list[str], run: Path) -> dict[str, Any]:
    main([*args, f"hydra.run.dir={run}"])
    return json.loads((run / "report.json").read_text())  # type: ignore[no-any-return]


def _manifest(run: Path) -> dict[str, Any]:
    return json.loads((run / "checkpoints" / "latest").parent.joinpath(
        (run / "checkpoints" / "latest").read_text().strip(), "manifest.json").read_text())  # fmt: skip


@pytest.mark.parametrize("name", list(MODELS))
def test_ptq_gptq_and_qat_on_each_imported_model(hf_dirs: dict[str, Path], tmp_path: Path, name: str) -> None:
    src = f"init_from=hf:{hf_dirs[name]}"
    ptq = _run(["mode=ptq", "quant=int4", "ptq.method=gptq", "ptq.calib_batches=1", src, *DATA], tmp_path / "p")
    assert ptq["quant"]["method"] == "gptq" and ptq["val_bpb"] > 0 and ptq["reference_val_bpb"] > 0
    manifest = _manifest(tmp_path / "p")
    assert manifest["imported_from"]["model_type"] == json.loads((hf_dirs[name] / "config.json").read_text())[
        "model_type"]  # fmt: skip
    assert manifest["model"]["block_size"] == 32 and manifest["tokenizer"]["kind"] == "hf"
    qat = _run(["mode=qat", "quant=int4", "qat.init=rtn", src, *DATA, *STEPS], tmp_path / "q")
    assert qat["step"] == 3 and qat["val_loss"] > 0


def test_every_other_mode_on_an_imported_model(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    hf = hf_dirs["qwen2_bias"]
    ev = _run(["mode=eval", f"init_from=hf:{hf}", *DATA], tmp_path / "e")
    assert ev["tokenizer"]["kind"] == "hf" and ev["val_bpb"] > 0 and ev["val_ppl"] > 1
    gen = _run(["mode=generate", f"init_from=hf:{hf}", "generate.max_new_tokens=8", "generate.prompt=ROMEO"],
               tmp_path / "g")  # fmt: skip
    assert gen["text"].startswith("ROMEO")
    ptq = _run(["mode=ptq", "quant=int4", "ptq.method=rtn", f"init_from=hf:{hf}", *DATA], tmp_path / "p")
    cmp = _run(["mode=eval", f"init_from={tmp_path / 'p'}", f"compare_to=hf:{hf}", *DATA], tmp_path / "c")
    assert cmp["reference_val_ppl"] == pytest.approx(ptq["reference_val_ppl"], rel=1e-5)  # the same windows
    assert 0 < cmp["top1_agreement"] <= 1 and cmp["logit_kl"] > 0
    ft = _run(["mode=finetune", f"init_from={tmp_path / 'p'}", *DATA, *STEPS], tmp_path / "f")
    assert ft["step"] == 3
    finetuned = _manifest(tmp_path / "f")
    assert finetuned["imported_from"]["files"]["tokenizer.json"]["sha256"] == finetuned["tokenizer"]["sha256"]
    ver = _run(["mode=verify", f"init_from={tmp_path / 'f'}"], tmp_path / "v")
    assert ver["ok"] is True
    _run(["mode=upgrade", f"init_from={tmp_path / 'f'}", f"out={tmp_path / 'up'}"], tmp_path / "u")
    assert (tmp_path / "up" / "manifest.json").is_file()
    exp = _run(["mode=export", f"init_from={tmp_path / 'up'}", f"out={tmp_path / 'x'}"], tmp_path / "xr")
    assert exp["export"]["dequantized_from"] == "int4 group 32" and exp["export"]["model_type"] == "qwen2"
    assert json.loads((tmp_path / "x" / "config.json").read_text())["max_position_embeddings"] == 32


def test_unsupported_model_and_taken_out_exit_2(
    hf_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "mistral"
    bad.mkdir()
    for f in hf_dirs["llama_gqa"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=16)
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_:
        main(["mode=eval", f"init_from=hf:{bad}", *DATA, f"hydra.run.dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "sliding_window=16" in err and "Traceback" not in err
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main(["mode=export", f"init_from=hf:{hf_dirs['qwen2_bias']}", f"out={tmp_path / 'taken'}",
              f"hydra.run.dir={tmp_path / 'r2'}"])  # fmt: skip
    assert exit_.value.code == 2 and "already exists" in capsys.readouterr().err
