"""Classify with an exported HeteroTune model. Needs only onnxruntime and numpy, plus tokenizers (text models)
or pillow (image models): pip install onnxruntime numpy tokenizers   (or: ... pillow)

    python predict_example.py --text "what a great day" --text "awful service"
    python predict_example.py --image cat.jpg

Copied into every package by `edge-agent export`; it reads model_card.json, labels.json and tokenizer.json or
preprocess.json from its own directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def text_inputs(texts: list[str], max_length: int) -> dict[str, Any]:
    import numpy as np
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(HERE / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_length)
    pad = tokenizer.padding or {"pad_id": tokenizer.token_to_id("[PAD]") or 0, "pad_token": "[PAD]"}
    tokenizer.enable_padding(pad_id=int(pad["pad_id"]), pad_token=str(pad["pad_token"]))
    encodings = tokenizer.encode_batch(texts)
    return {"input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64)}


def image_inputs(paths: list[str]) -> dict[str, Any]:
    """preprocess.json's steps. Pillow's bilinear resize antialiases, the training pipeline does not: expect
    tiny differences in the logits for images not already at the model's size (never for images that are)."""
    import numpy as np
    from PIL import Image

    spec = json.loads((HERE / "preprocess.json").read_text())
    size = tuple(spec["size"])
    mean = np.array(spec["mean"], np.float32).reshape(3, 1, 1)
    std = np.array(spec["std"], np.float32).reshape(3, 1, 1)
    batch = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        if image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        x = np.asarray(image, np.float32).transpose(2, 0, 1) / np.float32(255.0)
        batch.append((x - mean) / std)
    return {"pixel_values": np.ascontiguousarray(np.stack(batch))}


def main() -> None:
    import numpy as np
    import onnxruntime

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", action="append", default=[])
    parser.add_argument("--image", action="append", default=[])
    parser.add_argument("--int8", action="store_true", help="use model.int8.onnx")
    args = parser.parse_args()
    card = json.loads((HERE / "model_card.json").read_text())
    labels = json.loads((HERE / "labels.json").read_text())
    if card["modality"] == "text":
        if not args.text:
            parser.error("give --text (this is a text model)")
        inputs, shown = text_inputs(args.text, card["max_length"]), args.text
    else:
        if not args.image:
            parser.error("give --image (this is an image model)")
        inputs, shown = image_inputs(args.image), args.image
    session = onnxruntime.InferenceSession(str(HERE / ("model.int8.onnx" if args.int8 else "model.onnx")),
                                           providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], inputs)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = shifted / shifted.sum(axis=1, keepdims=True)
    for item, row in zip(shown, probs, strict=True):
        best = int(row.argmax())
        print(f"{labels[best]}\t{row[best]:.3f}\t{item}")


if __name__ == "__main__":
    main()
