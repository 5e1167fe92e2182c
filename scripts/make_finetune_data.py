"""Write the bundled fine-tuning sets, tinylm/data/finetune/*.jsonl, from Tiny Shakespeare.

    python scripts/make_finetune_data.py            # rewrites the four files
    python scripts/make_finetune_data.py --check    # exit 1 if they differ from a fresh make

The tasks, the word lists and the held-out splits are defined in
tinylm/finetune/tasks.py; the same seed gives the same files byte for byte.
"""

from __future__ import annotations

import argparse
import sys

from tinylm.data import bundled_text_path
from tinylm.finetune.jsonl import write_jsonl
from tinylm.finetune.tasks import DATA_DIR, FILES, SEED, make_sets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--check", action="store_true",
                        help="compare with the files instead of writing them")
    args = parser.parse_args(argv)
    sets = make_sets(bundled_text_path().read_text(encoding="utf-8"), seed=args.seed)
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    stale = []
    for name, records in sets.items():
        path = DATA_DIR / FILES[name]
        if args.check:
            fresh = DATA_DIR / (FILES[name] + ".check")
            write_jsonl(fresh, records)
            if not path.is_file() or path.read_bytes() != fresh.read_bytes():
                stale.append(str(path))
            fresh.unlink()
        else:
            write_jsonl(path, records)
            print(f"{path}: {len(records)} records")
    if stale:
        print("out of date (run scripts/make_finetune_data.py): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
