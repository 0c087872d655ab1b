"""Worker for tests/parallel/test_tensor_parallel.py (run under torchrun): the tiny model of one architecture,
tensor-parallel over all ranks, against the unsharded model on the same weights and batch. Rank 0 writes the
loss, the gradient differences and the losses of 3 AdamW steps as JSON."""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from megatron_hope.config import load
from megatron_hope.model.lm import HopeLM
from megatron_hope.parallel.tensor_parallel import apply_tensor_parallel


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def main(arch: str, sp: bool, out: str) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    cfg = load(f"configs/{arch}_tiny.toml", ["--model.memory.eta_max=0.1"]).model
    torch.manual_seed(0)
    ref = HopeLM(cfg)
    model = HopeLM(cfg)
    model.load_state_dict(ref.state_dict())
    apply_tensor_parallel(model, mesh, sequence_parallel=sp)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=g)
    doc_start = torch.zeros(2, 32, dtype=torch.bool)
    doc_start[:, 0] = True
    doc_start[1, 20] = True
    x, y = tokens[:, :-1], tokens[:, 1:]
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, ref_losses, grad_err = [], [], 0.0
    for step in range(3):
        ref_loss = ref(x, doc_start, targets=y)
        ref_loss.backward()
        with loss_parallel():
            loss = model(x, doc_start, targets=y)
            loss.backward()
        if step == 0:
            ref_grads = dict(ref.named_parameters())
            for n, p in model.named_parameters():
                d = (full(p.grad) - ref_grads[n].grad).abs().max() / ref_grads[n].grad.abs().max().clamp_min(1e-12)
                grad_err = max(grad_err, d.item())
        opt_ref.step(); opt.step(); opt_ref.zero_grad(); opt.zero_grad()
        losses.append(full(loss).item())
        ref_losses.append(ref_loss.item())
    param_err = max(((full(p.detach()) - q.detach()).abs().max()).item()
                    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()))
    if dist.get_rank() == 0:
        json.dump({"losses": losses, "ref_losses": ref_losses, "grad_rel_err": grad_err, "param_err": param_err},
                  open(out, "w"))
    dist.barrier()  # every rank done before gloo tears down
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "sp", sys.argv[3])
    # Gloo's worker threads can still hold tensors at interpreter finalisation and abort the process
    # ("terminate called without an active exception"; pytorch/pytorch PR 179291): the results are written
    # and the group destroyed, so leave without finalising.
    sys.stdout.flush()
    os._exit(0)
