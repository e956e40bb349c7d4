"""Append the transcoder columns of one activation dataset to another built over the same
corpus, so a shipped dataset gains transcoder features without its other columns (and the
explanations computed from them) changing.

    python tools/append_dataset_blocks.py --base tdb_agent/assets/datasets/tdb-tiny \
        --extra /tmp/ds-with-transcoders --out /tmp/merged

Both must hold the same tokens and documents and the same build settings (checked); the
extra one must hold every base block first, in the same order (`datasets/components.py`
appends transcoder blocks last). The result has the base's arrays for its columns and the
extra's for the appended blocks; its manifest records both builds. Transcoder columns the
base already holds (they come last) are replaced: retrained transcoders get new columns
while every other column, and the explanations computed from it, stays. Then gzip it with
`datasets.store.compress`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from tdb_agent.datasets.store import DATA, MANIFEST, load_bytes, read_member

PER_COLUMN_GROUPS = ("top", "random", "quantile")
PER_COLUMN = ("start", "length", "center", "value", "acts")
SHARED = ("tokens", "doc_lengths", "top.attn_key", "random.attn_key", "quantile.attn_key")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--extra", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    mb = json.loads((Path(args.base) / MANIFEST).read_text())
    me = json.loads((Path(args.extra) / MANIFEST).read_text())
    a = load_bytes(read_member(args.base, DATA))
    b = load_bytes(read_member(args.extra, DATA))
    for key in ("model_fingerprint", "sae_fingerprints", "n_tokens", "n_documents", "config"):
        if mb[key] != me[key]:
            raise SystemExit(f"the datasets differ in {key}: {mb[key]!r} vs {me[key]!r}")
    for key in ("tokens", "doc_lengths"):
        if not np.array_equal(a[key], b[key]):
            raise SystemExit(f"the datasets hold different {key}")
    kept = [blk for blk in mb["blocks"] if blk["kind"] != "transcoder"]
    if mb["blocks"][: len(kept)] != kept:
        raise SystemExit("the base's transcoder blocks are not its last ones")
    n_base = mb["blocks"][len(kept)]["offset"] if len(kept) < len(mb["blocks"]) else mb["n_components"]
    if me["blocks"][: len(kept)] != kept:
        raise SystemExit("the extra dataset does not start with the base's blocks")
    added = me["blocks"][len(kept):]
    if not added or any(blk["kind"] != "transcoder" for blk in added):
        raise SystemExit(f"nothing to append, or not only transcoder blocks: {added}")
    out = {k: a[k] for k in SHARED}  # heads' attended keys: rows per head, all in the base
    cols = [f"{g}.{f}" for g in PER_COLUMN_GROUPS for f in PER_COLUMN] + [
        "scale", "stats.mean", "stats.max", "stats.frac_active", "quantile.edges"]
    for k in cols:
        out[k] = np.ascontiguousarray(np.concatenate([a[k][:n_base], b[k][n_base:]]))
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(out, str(folder / DATA))
    m = dict(mb)
    m.update(blocks=kept + added, n_components=me["n_components"],
             transcoder_fingerprints=me["transcoder_fingerprints"])
    m["notes"] = (mb["notes"].split("; columns ")[0] + f"; columns {n_base}.. (transcoder features) appended "
                  f"from a build over the same corpus and settings by tools/append_dataset_blocks.py (that build "
                  f"took {me['build_seconds']} s)")
    (folder / MANIFEST).write_text(json.dumps(m, indent=2) + "\n")
    print(f"{n_base} + {me['n_components'] - n_base} columns -> {folder}")


if __name__ == "__main__":
    main()
