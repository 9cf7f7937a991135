"""qnli: the paper's NLU setting (REFERENCE.md); ':official' for the published code's settings."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def get_config(arg=None):
  return common.variant(common.paper_nlu("qnli", local_steps=30), arg)
