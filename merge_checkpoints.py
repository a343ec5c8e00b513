"""Average the weights of several checkpoints into one new checkpoint (checkpoint merging).

    python merge_checkpoints.py OUT CHECKPOINT CHECKPOINT [CHECKPOINT ...]

F2LLM-v2 saves extra checkpoints for merging (config key `merge_checkpoints`: step_5 and every 500
steps of the last 2,500). This script takes a uniform average of the chosen checkpoints' weights,
computed in float32 and stored in the first checkpoint's dtype, and writes it with the first
checkpoint's config, tokenizer, max_seq_length and prompts: a checkpoint that AutoModel,
sentence-transformers, evaluate.py and mteb_eval.py load like any other. Which checkpoints to
merge is the user's choice.
"""
import argparse
import os

from errors import UserError, exit_on_user_error
from model import (dtype_argument, family_of, load_pretrained, load_tokenizer, save_inference_model, st_pooling,
                   st_settings)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("output", help="folder to write the merged checkpoint to (must not exist)")
    p.add_argument("checkpoints", nargs="+", help="two or more checkpoints (step_N / epoch_N folders) of one model")
    return p.parse_args(argv)


def load_weights(path):
    """A checkpoint's model in its own dtype, checked like a training backbone (a folder of a
    supported decoder or encoder, with every weight present)."""
    return load_pretrained(path, "checkpoint", **dtype_argument("auto"))


def merge(paths):
    """The first checkpoint's model, holding the uniform average of every checkpoint's weights."""
    merged = load_weights(paths[0])
    first = merged.state_dict()
    sums = {key: value.float().clone() for key, value in first.items()}
    for path in paths[1:]:
        other = load_weights(path).state_dict()
        if other.keys() != first.keys():
            raise UserError(f"{path} and {paths[0]} hold different weights ({len(other)} and {len(first)} tensors): "
                            "merge checkpoints of one model only")
        for key, value in other.items():
            if value.shape != first[key].shape:
                raise UserError(f"{path}: {key} has shape {tuple(value.shape)}, {paths[0]} "
                                f"{tuple(first[key].shape)}: merge checkpoints of one model only")
            sums[key] += value.float()
    merged.load_state_dict({key: (total / len(paths)).to(first[key].dtype) for key, total in sums.items()})
    return merged


def merge_into(checkpoints, output):
    """Average two or more checkpoints of one model into the new folder `output`, with the first
    checkpoint's config, tokenizer, max_seq_length and prompts; returns the merged model."""
    if len(checkpoints) < 2:
        raise UserError("merging needs two or more checkpoints")
    if os.path.exists(output):
        raise UserError(f"{output} exists: pass a new folder for the merged checkpoint")
    merged = merge(checkpoints)
    max_seq_length, prompts = st_settings(checkpoints[0])
    tokenizer = load_tokenizer(checkpoints[0], "checkpoint", special_tokens=family_of(merged).special_tokens)
    save_inference_model(merged, tokenizer, output, max_seq_length, prompts, pooling=st_pooling(checkpoints[0]))
    return merged


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    merge_into(args.checkpoints, args.output)
    print(f"merged {len(args.checkpoints)} checkpoints into {args.output}")


if __name__ == "__main__":
    main()
