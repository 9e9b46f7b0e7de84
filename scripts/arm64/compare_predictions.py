"""Compare two `edge-agent predict --json` outputs (x86_64 and emulated aarch64) and print a verdict.

Run by scripts/arm64/predict.sh; not part of CI. Only the standard library (numpy for --raw). The labels must
be identical input by input; the probabilities are float32 results of two onnxruntime builds on two instruction
sets, so they are compared with a tolerance (default 1e-4, absolute) and the largest difference is reported.
Exit 0 when both hold, 1 otherwise; the numbers go to --out as JSON too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def compare(x86: dict[str, Any], arm: dict[str, Any]) -> dict[str, Any]:
    """Label agreement and the largest probability difference, input by input (inputs must match in order)."""
    a, b = x86["predictions"], arm["predictions"]
    if [p["input"] for p in a] != [p["input"] for p in b]:
        raise ValueError("the two outputs classify different inputs; run both on the same --file")
    mismatched = [i for i, (p, q) in enumerate(zip(a, b, strict=True)) if p["label"] != q["label"]]
    diff = max((abs(p["probabilities"][k] - q["probabilities"][k]) for p, q in zip(a, b, strict=True)
                for k in p["probabilities"]), default=0.0)
    return {"inputs": len(a), "labels_identical": not mismatched, "mismatched_inputs": mismatched,
            "max_probability_difference": diff, "accuracy_x86": x86.get("accuracy"),
            "accuracy_arm64": arm.get("accuracy")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("x86", type=Path)
    parser.add_argument("arm64", type=Path)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--raw", type=Path, nargs=2, metavar=("X86_NPY", "ARM64_NPY"),
                        help="unrounded probabilities of both sides (raw_probs.py); their max difference is reported")
    args = parser.parse_args()
    result = compare(json.loads(args.x86.read_text()), json.loads(args.arm64.read_text()))
    if args.raw is not None:
        import numpy as np

        x86_raw, arm_raw = (np.load(p) for p in args.raw)
        if x86_raw.shape != arm_raw.shape or x86_raw.shape[0] != result["inputs"]:
            raise ValueError(f"raw probabilities of shapes {x86_raw.shape} and {arm_raw.shape} do not match the "
                             f"{result['inputs']} inputs")
        result["max_probability_difference_unrounded"] = float(np.abs(x86_raw - arm_raw).max())
        result["labels_identical_unrounded"] = bool((x86_raw.argmax(-1) == arm_raw.argmax(-1)).all())
    passed = (result["labels_identical"] and result["max_probability_difference"] <= args.tolerance
              and result.get("labels_identical_unrounded", True)
              and result.get("max_probability_difference_unrounded", 0.0) <= args.tolerance)
    result = {**result, "tolerance": args.tolerance, "passed": passed}
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    labels = "identical" if result["labels_identical"] else f"DIFFER at inputs {result['mismatched_inputs']}"
    print(f"{result['inputs']} inputs: labels {labels}; "
          f"max probability difference {result['max_probability_difference']:.2e} (tolerance {args.tolerance:g}); "
          f"accuracy x86 {result['accuracy_x86']} / arm64 {result['accuracy_arm64']}")
    if "max_probability_difference_unrounded" in result:
        print(f"unrounded float32 probabilities: max difference {result['max_probability_difference_unrounded']:.2e}")
    print("VERDICT: PASS (arm64 prints the same labels as x86)" if passed else "VERDICT: FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
