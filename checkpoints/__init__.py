"""Sharded checkpoints of a whole training run (torch.distributed.checkpoint), and their command-line tools.

A checkpoint is runs_dir/run_name/checkpoints/step_NNNNNNNN/:
  * DCP shards (__R_0.distcp) + .metadata: "model" (parameters by the full model's names) and "optim" (AdamW's
    per-parameter state by the same names); tensors only, so that a load unpickles nothing but tensors. Any
    layout (tensor, pipeline and data parallel) saves and loads these names: a load reshards to its own layout.
  * run_state.json: steps done, tokens consumed, the LR schedule, the data loader's position, the CMS levels'
    phase (= steps done), the layout and engine that saved it, the code version.
  * config.toml: the resolved config of the run that saved it.
  * rank_RRRRR.json + rank_RRRRR.pt: each rank's RNG states; its pending CMS gradient accumulators.
  * manifest.json, written last: every other file's size and sha256.
The directory is written as .tmp-step_NNNNNNNN and renamed into place when complete, then `latest` (a text
file naming it) is replaced; so a directory named step_* is complete, and a crash mid-save leaves only a .tmp-*.
"""
