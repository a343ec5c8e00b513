"""F2LLM-v2 options and LoRA: Matryoshka loss, distillation, LoRA merge, and training runs that use
them (with the retrieval metrics and throughput logged beside the losses)."""
import math
import os

import pytest
import torch
from conftest import assert_user_error, call_main, run_cli
from sentence_transformers import SentenceTransformer
from test_train import scalars, train_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModel

import demo
import loss
import lora
import model
import run
from config import LORA_DEFAULTS

pytestmark = pytest.mark.usefixtures("one_thread")


def random_batch(bs=4, k=3, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(bs * (2 + k), d, generator=g)


# ---- Matryoshka ----------------------------------------------------------------------------------

def test_matryoshka_dims_default_to_powers_of_two_below_the_hidden_size():
    assert loss.matryoshka_dims(64) == [8, 16, 32]
    assert loss.matryoshka_dims(1024) == [8, 16, 32, 64, 128, 256, 512]
    assert loss.matryoshka_dims(2560)[-1] == 2048
    assert loss.matryoshka_dims(64, [32, 16]) == [16, 32]


def test_matryoshka_weight_counts_the_full_dimension_as_term_one():
    assert loss.matryoshka_weight(1, 64, 64) == 1
    assert loss.matryoshka_weight(2, 16, 64) == pytest.approx(1 / (2 * 2))
    assert loss.matryoshka_weight(3, 8, 128) == pytest.approx(1 / (3 * 4))


@pytest.mark.parametrize("task", ["retrieval", "clustering"])
def test_mrl_term_is_the_weighted_losses_on_truncated_embeddings(task):
    bs, k, d = 4, 3, 32
    emb = random_batch(bs, k, d)
    plain = loss.f2llm_losses(emb, bs, k, task)
    out = loss.f2llm_losses(emb, bs, k, task, mrl_dims=[8, 16])
    assert out["hard"] == plain["hard"] and set(out) == set(plain) | {f"mrl_{kind}" for kind in plain}
    # The published loop: for dim in sorted(mrl_dims + [d])[::-1], term n (from 1) divided by n sqrt(d / dim),
    # for each loss apart.
    for kind in plain:
        expected = 0
        for n, dim in enumerate(sorted([8, 16] + [d])[::-1], start=1):
            cut = loss.f2llm_losses(emb[:, :dim].contiguous(), bs, k, task)
            expected += cut[kind] / (n * math.sqrt(d / dim))
        assert (out[f"mrl_{kind}"] + plain[kind]).item() == pytest.approx(expected.item(), rel=1e-5)
    # The truncated terms see only the first dimensions: changing the rest leaves them alone.
    changed = emb.clone()
    changed[:, 16:] = torch.randn_like(changed[:, 16:])
    redo = loss.f2llm_losses(changed, bs, k, task, mrl_dims=[8, 16])
    assert redo["mrl_hard"].item() == pytest.approx(out["mrl_hard"].item(), rel=1e-5)
    assert redo["hard"].item() != pytest.approx(out["hard"].item(), rel=1e-3)


# ---- distillation --------------------------------------------------------------------------------

def test_matryoshka_weights_at_the_4b_width():
    """At d = 2560 (Qwen3-4B) the published order gives the 2048-dim term n = 2, weight 0.447."""
    dims = sorted(loss.matryoshka_dims(2560), reverse=True)
    assert dims[0] == 2048 and loss.matryoshka_weight(2, dims[0], 2560) == pytest.approx(0.4472, abs=1e-4)
    assert loss.matryoshka_weight(len(dims) + 1, 8, 2560) == pytest.approx(1 / (10 * math.sqrt(320)))


def test_kd_loss_is_the_published_sum_of_three_raw_mses():
    bs, k = 4, 3
    student, teacher = random_batch(bs, k, 16), torch.randn(bs * (2 + k), 40)
    cut = teacher[:, :16]
    expected = (((student[:bs] - cut[:bs]) ** 2).mean() + ((student[bs:2 * bs] - cut[bs:2 * bs]) ** 2).mean()
                + ((student[2 * bs:] - cut[2 * bs:]) ** 2).mean())
    assert loss.kd_loss(student, teacher, bs).item() == pytest.approx(expected.item(), rel=1e-5)
    # Raw, not normalised: a teacher 3x the student differs from it.
    assert loss.kd_loss(student, torch.cat([student, teacher[:, 16:]], 1), bs).item() == 0
    assert loss.kd_loss(student, torch.cat([3 * student, teacher[:, 16:]], 1), bs).item() > 0.1
    out = loss.f2llm_losses(student, bs, k, "retrieval", teacher=teacher, kd_weight=0.5)
    assert out["kd"].item() == pytest.approx(0.5 * expected.item(), rel=1e-5)


# ---- LoRA ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_backbone(tiny):
    backbone = lora.add_lora(model.load_backbone(f"{tiny}/backbone"), {**LORA_DEFAULTS, "r": 4})
    torch.manual_seed(0)
    for name, param in backbone.named_parameters():
        if "lora_B" in name:  # zero at init: give the adapters something to add
            param.data.normal_(0, 0.1)
    return backbone


def test_lora_trains_only_the_adapters(lora_backbone):
    trainable = [n for n, p in lora_backbone.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # target_modules null: every linear layer, which for Qwen3 are its seven projections
    assert LORA_DEFAULTS["target_modules"] is None
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"}


def test_merged_weights_embed_like_the_adapted_model(lora_backbone, tiny, tmp_path):
    ids, lengths = model.flatten([[5, 6, 7, 2], [8, 9, 2], [4] * 9 + [2]])
    with torch.no_grad():
        adapted = model.Embedder(lora_backbone).eval()(ids, lengths)
    state = lora.merged_state_dict(lora_backbone)
    assert not any("lora" in key or "base_layer" in key for key in state)
    lora_backbone.get_base_model().save_pretrained(tmp_path, state_dict=state)
    plain = AutoModel.from_pretrained(tmp_path)
    with torch.no_grad():
        merged = model.Embedder(plain).eval()(ids, lengths)
        original = model.Embedder(AutoModel.from_pretrained(f"{tiny}/backbone")).eval()(ids, lengths)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(original, adapted, atol=1e-3)


def test_lora_unknown_target_module_is_one_line(tiny, tokenized, tmp_path):
    path, _ = train_config(tmp_path, tiny, tokenized, lora={"target_modules": ["no_such_proj"]})
    assert_user_error(call_main(run.main, ["--config", path]), "lora", "target_modules")


# ---- training runs ---------------------------------------------------------------------------------

def tb_at(tb_dir, tag):
    return dict(scalars(tb_dir, tag))


def test_mrl_kd_and_lora_train_and_resume(tmp_path, tiny, tokenized, teacher):
    """One run with every option on: the logged terms add up to the total, only the LoRA targets
    change in the saved (merged) weights, and a run resumed from step 3 ends where it would have."""
    options = dict(use_mrl=True, mrl_dims=[8, 16], teacher_model_path=teacher, kd_weight=0.5,
                   lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
                   learning_rate=5e-3, train_steps=6, checkpointing_steps=3, validation_steps=3, log_interval=1,
                   save_total_limit=0)
    (tmp_path / "a").mkdir()
    config, values = train_config(tmp_path / "a", tiny, tokenized, **options)
    proc = run_cli("run.py", "--config", config)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    tb = values["tb_dir"]
    tags = EventAccumulator(os.path.join(tb, "e2e")).Reload().Tags()["scalars"]
    datasets = {tag.split("/")[1] for tag in tags if tag.startswith("train/") and tag.endswith("/total")}
    assert datasets, tags
    for name in datasets:
        kinds = (("inbatch", "mrl_inbatch") if f"train/{name}/inbatch" in tags else ()) + ("hard", "mrl_hard", "kd")
        for step, total in tb_at(tb, f"train/{name}/total").items():
            terms = [tb_at(tb, f"train/{name}/{kind}")[step] for kind in kinds]
            assert total == pytest.approx(sum(terms), rel=1e-5) and min(terms) > 0
    # validated at steps 3 and 6, once each: the last step is both a validation step and the run's end
    assert [step for step, _ in scalars(tb, "valid/msmarco/mrl_inbatch")] == [3, 6]
    assert not os.path.exists(f"{tb}/e2e/valid/msmarco/kd")
    for key in ("ndcg@10", "mrr@10", "recall@10"):
        assert all(0 <= v <= 1 for v in tb_at(tb, f"valid/retrieval/{key}").values())
    assert all(v > 0 for v in tb_at(tb, "train/tokens_per_s").values())

    final = os.path.join(values["output_dir"], "e2e", "step_6")
    trained = AutoModel.from_pretrained(final).state_dict()
    initial = AutoModel.from_pretrained(f"{tiny}/backbone").state_dict()
    assert set(trained) == set(initial)
    changed = {key for key in initial if not torch.equal(trained[key], initial[key])}
    assert changed and all(key.split(".")[-2] in ("q_proj", "v_proj", "down_proj") for key in changed), changed
    texts = ["what is the capital of france", "paris is the capital of france", "a"]
    ours = model.load_encoder(final, device="cpu").encode(texts)
    theirs = SentenceTransformer(final, device="cpu").encode(texts)  # the merged weights, without peft
    assert ((torch.as_tensor(ours) * torch.as_tensor(theirs)).sum(dim=1) >= 0.9999).all()

    (tmp_path / "b").mkdir()
    config, values_b = train_config(tmp_path / "b", tiny, tokenized, **options,
                                    resume_from=os.path.join(values["output_dir"], "e2e", "step_3"))
    proc = run_cli("run.py", "--config", config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    resumed = AutoModel.from_pretrained(os.path.join(values_b["output_dir"], "e2e", "step_6")).state_dict()
    for key in trained:
        torch.testing.assert_close(resumed[key], trained[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["narrow teacher", "other tokenizer", "mrl_dims too large"])
def test_v2_option_errors_are_one_line(case, tmp_path, tiny, tokenized, teacher):
    if case == "narrow teacher":
        path = str(tmp_path / "narrow")
        model.load_tokenizer(f"{tiny}/backbone").save_pretrained(path)
        demo.build_backbone(path, 400, hidden_size=16, num_layers=1)
        options, fragments = {"teacher_model_path": path}, ["teacher_model_path", "hidden size 16", "32"]
    elif case == "other tokenizer":
        path = str(tmp_path / "other")
        tokenizer = demo.build_tokenizer(path, ["completely different words here"] * 10, vocab_size=300)
        demo.build_backbone(path, len(tokenizer), hidden_size=48, num_layers=1)
        options, fragments = {"teacher_model_path": path}, ["teacher_model_path", "tokenizer differs"]
    else:
        options, fragments = {"use_mrl": True, "mrl_dims": [16, 32]}, ["mrl_dims", "hidden size 32"]
    config, _ = train_config(tmp_path, tiny, tokenized, **options)
    assert_user_error(call_main(run.main, ["--config", config]), *fragments)
