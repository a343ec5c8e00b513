"""F2LLM-v2's checkpoints for merging (merge_checkpoints) and merge_checkpoints.py."""
import json
import os

import pytest
import torch
from sentence_transformers import SentenceTransformer

import demo
import merge_checkpoints
import model
from config import Config
from conftest import assert_user_error, call_main, run_dir, weights
from run import checkpoint_due


@pytest.mark.parametrize("checkpointing_steps", [5000, 0, 700])
def test_checkpoint_due_adds_the_published_merging_checkpoints(checkpointing_steps):
    """The published condition, verbatim: completed_steps == 5 or args.checkpointing_steps and
    (completed_steps % args.checkpointing_steps == 0 or (completed_steps % 500 == 0 and
    completed_steps > args.train_steps - 2500))."""
    total = 12_345
    merging = Config(model_path="m", train_data_path="d", checkpointing_steps=checkpointing_steps,
                     merge_checkpoints=True)
    plain = Config(model_path="m", train_data_path="d", checkpointing_steps=checkpointing_steps)
    published = {s for s in range(1, total + 1) if s == 5 or checkpointing_steps and (
        s % checkpointing_steps == 0 or (s % 500 == 0 and s > total - 2500))}
    assert {s for s in range(1, total + 1) if checkpoint_due(s, total, merging)} == published
    assert {s for s in range(1, total + 1) if checkpoint_due(s, total, plain)} == (
        set(range(checkpointing_steps, total + 1, checkpointing_steps)) if checkpointing_steps else set())


def test_merge_averages_the_weights(reference, tmp_path):
    """Three checkpoints of a training run: the merged weights are their mean, and the result is a
    checkpoint that sentence-transformers loads with the encoder's vectors and the run's settings."""
    paths = [os.path.join(run_dir(reference[1]), f"step_{s}") for s in (5, 10, 15)]
    out = str(tmp_path / "merged")
    proc = call_main(merge_checkpoints.main, [out, *paths])
    assert proc.returncode == 0, proc.stderr
    assert f"merged 3 checkpoints into {out}" in proc.stdout
    merged, parts = weights(out), [weights(p) for p in paths]
    assert merged.keys() == parts[0].keys()
    for key in merged:
        torch.testing.assert_close(merged[key], sum(p[key] for p in parts) / 3, rtol=1e-6, atol=1e-7, msg=key)
    assert any(not torch.equal(merged[k], parts[0][k]) for k in merged)
    with open(os.path.join(out, "sentence_bert_config.json")) as f:
        assert json.load(f)["max_seq_length"] == reference[1]["max_seq_length"]
    texts = ["what is the capital of france", "paris is the capital of france", "a"]
    ours = torch.as_tensor(model.load_encoder(out, device="cpu").encode(texts))
    theirs = torch.as_tensor(SentenceTransformer(out, device="cpu").encode(texts))
    assert ((ours * theirs).sum(dim=1) >= 0.9999).all()


def test_merge_errors_are_one_line(reference, tiny, tmp_path):
    step = os.path.join(run_dir(reference[1]), "step_5")
    wide = str(tmp_path / "wide")
    model.load_tokenizer(f"{tiny}/backbone").save_pretrained(wide)
    demo.build_backbone(wide, 400, hidden_size=48, num_layers=2)
    (tmp_path / "exists").mkdir()
    for argv, fragments in (([str(tmp_path / "a"), step], ["two or more"]),
                            ([str(tmp_path / "exists"), step, step], ["exists"]),
                            ([str(tmp_path / "b"), step, str(tmp_path / "nowhere")], ["nowhere", "not found"]),
                            ([str(tmp_path / "c"), step, wide], ["shape", "one model only"])):
        assert_user_error(call_main(merge_checkpoints.main, argv), *fragments)
        assert not os.path.exists(argv[0]) or argv[0].endswith("exists")
