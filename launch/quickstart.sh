#!/usr/bin/env bash
# Quickstart: set up the environment, build the bundled corpus, tokenizer and shards, train a tiny HOPE on
# 2 CPU processes for a few minutes, print its validation perplexity and where the run's logs are.
# Each data step is skipped when its output exists. Extra arguments go to launch.train
# (e.g. `bash launch/quickstart.sh --train.train_steps=50`).
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/venv.sh
export OMP_NUM_THREADS=1  # one thread per process: 2 processes x 1 thread is the fast layout on 2 cores
DATA=data/quickstart  # must match [data] in configs/quickstart.toml

# the corpus is a Debian package (data_pipeline/corpus.py); a fresh machine needs its package lists first
if [ ! -f "$DATA/corpus/corpus.json" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
   && ! apt-cache show r-cran-janeaustenr >/dev/null 2>&1; then
  apt-get update -qq || echo "apt-get update failed; the corpus step will say what is missing"
fi
# each step's last-written file marks it done
if [ -f "$DATA/corpus/corpus.json" ]; then echo "corpus: $DATA/corpus (exists)"; else
  python -m data_pipeline.corpus --out "$DATA/corpus"
fi
if [ -f "$DATA/tokenizer/card.json" ]; then echo "tokenizer: $DATA/tokenizer (exists)"; else
  python -m data_pipeline.tokenizer train --input "$DATA/corpus" --out "$DATA/tokenizer" --vocab-size 2048
fi
if [ -f "$DATA/shards/manifest.json" ]; then echo "shards: $DATA/shards (exist)"; else
  python -m data_pipeline.prepare --input "$DATA/corpus" --tokenizer "$DATA/tokenizer" --out "$DATA/shards" \
    --shard-tokens 200000 --val-fraction 0.02
fi
torchrun --standalone --nproc_per_node=2 -m launch.train --config configs/quickstart.toml "$@"
