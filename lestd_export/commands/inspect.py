"""``lestd-export inspect MODEL|model.onnx|DIR``: where a model's bytes are, by weight group kind."""

from __future__ import annotations

import argparse
import json

from .common import MODEL_HELP


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect", help="show a model's weight groups, shapes, bytes and storage",
        description="What the tool finds in a model, a compressed checkpoint, an optimum export or an "
                    "onnxruntime-genai build: format, precision, architecture, each weight group kind "
                    "(embedding, attention Q/K/V and output, MLP in and out, lm_head, other) with its sites, "
                    "shapes and stored bytes, and what is already compressed or quantised.")
    parser.add_argument("model", nargs="?", default=None, help=MODEL_HELP + "; or a decoder .onnx / its directory")
    parser.add_argument("--json", action="store_true", help="print the whole record (every site) as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..inspect import inspect_model, summary

    weight_map = inspect_model(args.model)
    print(json.dumps(weight_map.to_dict(), indent=2) if args.json else summary(weight_map, args.model or "default"))
    return 0
