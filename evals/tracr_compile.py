"""Compile RASP programs with Tracr and store their weights as plain numpy (run once).

Needs `tracr-pypi` (and so jax), which the project does not depend on, so run it in a
separate environment; the eval itself only reads the stored `evals/tracr/*.npz`:

    python -m venv /tmp/tracr && /tmp/tracr/bin/pip install tracr-pypi
    /tmp/tracr/bin/python evals/tracr_compile.py          # writes evals/tracr/{hist,reverse}.npz + .json

Programs are compiled with causal attention (GPT-2 is causal); the evals read only the last
position, where a causal model sees the whole input, so both programs are exact there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tracr.compiler import compiling, lib
from tracr.rasp import rasp

OUT = Path(__file__).resolve().parent / "tracr"
VOCAB = ["a", "b", "c", "d"]
MAX_SEQ_LEN = 8


def programs() -> dict:
    return {"hist": lib.make_hist(), "reverse": lib.make_reverse(rasp.tokens)}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for name, prog in programs().items():
        m = compiling.compile_rasp_to_model(prog, vocab=set(VOCAB), max_seq_len=MAX_SEQ_LEN, compiler_bos="BOS",
                                            compiler_pad="PAD", causal=True)
        arrays = {f"{k}/{kk}": np.asarray(vv) for k, v in m.params.items() for kk, vv in v.items()}
        np.savez_compressed(OUT / f"{name}.npz", **arrays)
        cfg = m.model_config
        meta = {"program": name, "output": prog.label, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
                "key_size": cfg.key_size, "mlp_hidden_size": cfg.mlp_hidden_size, "max_seq_len": MAX_SEQ_LEN,
                "residual_labels": list(m.residual_labels),
                "input_encoding": {str(k): int(v) for k, v in m.input_encoder.encoding_map.items()},
                "output_values": [str(v) for v in m.output_encoder.encoding_map]
                if m.output_encoder is not None else None,
                "example": {"input": ["BOS", "a", "b", "a", "c"],
                            "output": [str(x) for x in m.apply(["BOS", "a", "b", "a", "c"]).decoded]}}
        (OUT / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")
        print(name, {k: v.shape for k, v in arrays.items()}, meta["example"])


if __name__ == "__main__":
    main()
