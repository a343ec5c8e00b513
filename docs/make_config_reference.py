"""Write docs/config.md, the config reference, from the Config fields of config.py (their metadata).

    python docs/make_config_reference.py            # (re)write docs/config.md
    python docs/make_config_reference.py --check    # exit 1, with one line, if docs/config.md is stale
"""
import argparse
import os
import sys

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)

from config import config_reference  # noqa: E402

COMMAND = "python docs/make_config_reference.py"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check that the file is up to date (exit 1 if not)")
    p.add_argument("--output", default=os.path.join(REPO_DIR, "docs", "config.md"), help="default: docs/config.md")
    args = p.parse_args(argv)
    text = config_reference()
    if args.check:
        current = open(args.output).read() if os.path.isfile(args.output) else None
        if current != text:
            print(f"{os.path.relpath(args.output)} is stale: it is not what the Config fields of config.py give; "
                  f"run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    with open(args.output, "w") as f:
        f.write(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
