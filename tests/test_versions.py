"""Library versions: the start-up check that refuses the packed layout on a transformers that would
embed it wrongly (the version faked, and the installed one: .ci/run runs this file on the floor
versions of requirements.txt too), packed == padded whatever the backbone's use_cache says, and
the transformers floor of requirements.txt against the check's minimum."""
import os
import random
import re

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from conftest import REPO_DIR, assert_user_error, call_main, write_config
from packaging import version

import model
import run
from errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")

TOO_OLD = ["4.51.3", "4.52.4", "4.53.0", "4.53.0.dev0"]
NEW_ENOUGH = ["4.53.1", "4.57.6", "5.0.0", "5.24.0", "6.0.0.dev0"]
ATTENTIONS = ["auto", "sdpa", "eager", "sdpa_varlen", "flex_attention", "flash_attention_2"]


def fake_transformers(monkeypatch, installed):
    """The version that model.check_library_support reads: model's own `transformers` (a test that
    re-imports transformers leaves sys.modules with another module object)."""
    monkeypatch.setattr(model.transformers, "__version__", installed)


def never_called(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} was called: the check must come first")
    return fail


def assert_packed_refusal(message, installed):
    assert "\n" not in message
    for fragment in (f"installed: {installed}", 'pip install -U "transformers>=4.53.1"',
                     '"batch_layout": "padded"', "wrong embeddings"):
        assert fragment in message, message


@pytest.mark.parametrize("installed", TOO_OLD)
def test_packed_is_refused_before_its_masks_exist(tiny, monkeypatch, installed):
    """Before 4.53.1 transformers builds no packed-sequence mask (sdpa, eager, flex let each sequence
    attend to the ones before it) and 4.51 / 4.52 lack sdpa_varlen's hook: every attention is refused
    before sdpa_varlen is registered and before the weights load."""
    fake_transformers(monkeypatch, installed)
    monkeypatch.setattr(model, "_register_sdpa_varlen", never_called("_register_sdpa_varlen"))
    monkeypatch.setattr(model, "load_pretrained", never_called("load_pretrained"))
    for attn in ATTENTIONS:
        with pytest.raises(UserError) as err:
            model.load_backbone(f"{tiny}/backbone", attn, "float32", packed=True)
        assert_packed_refusal(str(err.value), installed)


def test_padded_and_grouped_are_not_refused_on_an_old_transformers(tiny, monkeypatch):
    backbone = model.load_backbone(f"{tiny}/backbone", "sdpa", "float32")
    fake_transformers(monkeypatch, "4.51.3")
    for attn in ("auto", "sdpa", "eager", "flash_attention_2"):
        model.check_library_support(attn, packed=False)
    for layout in ("padded", "grouped"):
        model.Embedder(backbone, layout)
    # A backbone loaded for padded batches and then packed: the Embedder checks too.
    with pytest.raises(UserError) as err:
        model.Embedder(backbone, "packed")
    assert_packed_refusal(str(err.value), "4.51.3")
    # sdpa_varlen without packing (the config refuses it anyway): one line, not an ImportError.
    with pytest.raises(UserError, match='transformers>=4.53.1.*"attn_implementation": "sdpa"'):
        model.check_library_support("sdpa_varlen", packed=False)


@pytest.mark.parametrize("installed", NEW_ENOUGH)
def test_packed_is_accepted_from_4_53_1(monkeypatch, installed):
    fake_transformers(monkeypatch, installed)
    for attn in ATTENTIONS:
        model.check_library_support(attn, packed=True)


def test_training_stops_with_one_line_and_no_checkpoint(tmp_path, tiny, tokenized, monkeypatch):
    """run.py on the default layout (packed) under a transformers that would embed it wrongly."""
    fake_transformers(monkeypatch, "4.52.4")
    out = tmp_path / "out"
    path = write_config(tmp_path / "config.json", model_path=f"{tiny}/backbone", train_data_path=tokenized,
                        experiment_id="old", output_dir=str(out), tb_dir=str(tmp_path / "tb"),
                        cache_dir=str(tmp_path / "cache"), train_batch_size=4, max_seq_length=64, num_hard_neg=1)
    try:
        proc = call_main(run.main, ["--config", path])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # leave no accelerate state to other tests
        GradientState._reset_state()
    line = assert_user_error(proc, "transformers>=4.53.1", '"batch_layout": "padded"')
    assert "installed: 4.52.4" in line
    saved = [d for _, dirs, _ in os.walk(out) for d in dirs if d.startswith(("step_", "epoch_"))]
    assert not saved, saved
    # refused at start-up, next to the model folder check: no split cache, no locked run folder
    assert not (tmp_path / "cache").exists()
    assert not out.exists() or not any(out.rglob(".lock"))


@pytest.mark.parametrize("attn", ["sdpa", "eager", "sdpa_varlen"])
def test_packed_on_the_installed_transformers_is_refused_or_right(tiny, attn):
    """On the real installed transformers (in .ci/run's floor environment too): below the minimum the
    packed layout is refused; from it, packed batches embed each sequence alone (embeddings and
    gradients as the padded layout's, train and eval mode), even from a backbone whose config says
    use_cache=True (with a KV cache transformers skips its packed-sequence detection; the Embedder
    turns the cache off)."""
    installed = model.transformers.__version__
    if version.parse(installed) < version.parse(model.PACKED_MIN_TRANSFORMERS):
        with pytest.raises(UserError) as err:
            model.load_backbone(f"{tiny}/backbone", attn, "float32", packed=True)
        assert_packed_refusal(str(err.value), installed)
        return
    rnd = random.Random(0)
    sequences = [[rnd.randint(3, 390) for _ in range(rnd.choice([1, 2, rnd.randint(1, 24)]))] for _ in range(10)]
    input_ids, lengths = model.flatten(sequences)
    packed = model.Embedder(model.load_backbone(f"{tiny}/backbone", attn, "float32", packed=True), "packed")
    padded = model.Embedder(model.load_backbone(f"{tiny}/backbone", "sdpa", "float32"), "padded")
    for use_cache in (False, True):
        packed.backbone.config.use_cache = use_cache
        for train in (True, False):
            results = []
            for emb in (packed, padded):
                emb.train(train)
                emb.zero_grad()
                out = emb(input_ids, lengths)
                out.pow(2).sum().backward()
                results.append((out.detach(), {n: p.grad.clone() for n, p in emb.named_parameters()}))
            (got, got_grads), (expected, expected_grads) = results
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
            for name, grad in expected_grads.items():  # float32 sums in another order: relative to the largest
                assert (got_grads[name] - grad).abs().max() <= 1e-3 * grad.abs().max().clamp_min(1e-12), name


def test_the_transformers_floor_is_what_the_check_allows():
    """requirements.txt promises no transformers on which the default (packed) layout is refused."""
    with open(os.path.join(REPO_DIR, "requirements.txt")) as f:
        floor = re.search(r"^transformers>=(\S+)", f.read(), re.MULTILINE).group(1)
    assert version.parse(floor) >= version.parse(model.PACKED_MIN_TRANSFORMERS), floor


@pytest.mark.parametrize("family,needed,older", [("bert", "5.0.0", "4.57.6"), ("xlm-roberta", "5.0.0", "4.57.6"),
                                                 ("modernbert", "5.1.0", "5.0.0"), ("gemma3_text", "5.0.0", "4.57.6")])
def test_families_packed_on_a_transformers_too_old_for_them_are_refused(monkeypatch, family, needed, older):
    """Before 5.0 the BERT-style encoders' attention modules (before 5.1 ModernBERT's forward) do not take
    the packed boundaries: on 4.57.6 a packed BERT fails inside transformers, a packed ModernBERT on 5.0.0
    too (measured with tests/test_families.py). One line instead, which names the version and the way out;
    padded batches stay allowed, and Qwen's packed ones keep their older floor."""
    fake_transformers(monkeypatch, older)
    with pytest.raises(UserError) as err:
        model.check_library_support("auto", packed=True, model_type=family)
    message = str(err.value)
    assert "\n" not in message and f"with {family} needs transformers >= {needed}" in message
    assert f"installed: {older}" in message and '"batch_layout": "padded"' in message
    model.check_library_support("auto", packed=False, model_type=family)
    model.check_library_support("auto", packed=True, model_type="qwen3")
    fake_transformers(monkeypatch, needed)
    model.check_library_support("auto", packed=True, model_type=family)
