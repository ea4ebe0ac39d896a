"""Unit tests: pure CPU, small tensors, no model files. Makes `kiln` importable without PYTHONPATH=src."""

import importlib.util
import sys
from pathlib import Path

import torch

if importlib.util.find_spec("kiln") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

torch.set_num_threads(min(2, torch.get_num_threads()))
