"""How a multi-process run (torchrun) spreads the models over the ranks: config key ``parallel``.

ddp   every rank a replica and a share of every batch; DistributedDataParallel averages the gradients.
fsdp  every rank a share of every batch; the student is sharded with FSDP2 (``fully_shard`` on each block of
      the built-in GPTs, then on the whole model): parameters, gradients and optimizer state live in shards,
      gathered for the forward and backward. The LM head stays in the root's unit, whose parameters FSDP2
      keeps gathered after the forward, so the fused linear loss takes it as it is. The teacher is replicated.
tp    every rank the whole batch; the LM heads of student and teacher are vocabulary-parallel: each rank holds a
      contiguous slice of their rows (and of the tied token embedding, looked up shard by shard and summed over
      the ranks), and the fused linear loss runs with ``process_group`` (ttm_kernels.distributed). The rest of
      both models is replicated: the loss and the hidden-state gradient are the same on every rank, so the
      replicas' gradients and updates are too, with no all-reduce of their own.

Checkpoints hold whole tensors in every mode (gathered on every rank, written by rank 0), loadable by a run
with any mode or none; ``--resume`` shards them again. A single process (world 1) is the same in every mode.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

MODES = ("ddp", "fsdp", "tp")


def shard_widths(rows: int, world: int) -> list:
    """Rows per rank, the first ``rows % world`` ranks one more."""
    return [rows // world + (rank < rows % world) for rank in range(world)]


def gather_rows(local: torch.Tensor, widths, group=None) -> torch.Tensor:
    """The whole tensor whose consecutive row slices the ranks hold (``widths`` rows each), on every rank."""
    padded = local.new_zeros((max(widths), *local.shape[1:]))
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in widths]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:width] for part, width in zip(parts, widths)])


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) in the forward, the identity in the backward (Megatron's reduce_from_tensor_model_parallel
    region): each rank's upstream gradient is already the whole one, as everything after it is replicated."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class VocabShard:
    """This rank's slice of a vocabulary-sized parameter: rows [offset, offset + widths[rank]) of sum(widths)."""

    def _init_shard(self, group, widths):
        self.process_group, self.widths = group, tuple(widths)
        rank = dist.get_rank(group)
        self.offset = sum(widths[:rank])

    def rows(self):
        return slice(self.offset, self.offset + self.widths[dist.get_rank(self.process_group)])


class VocabShardLinear(nn.Linear, VocabShard):
    """An LM head's rows for this rank's vocabulary slice (its output: this rank's logits columns)."""

    def __init__(self, head: nn.Linear, weight: nn.Parameter, group, widths):
        nn.Module.__init__(self)
        self._init_shard(group, widths)
        self.in_features, self.out_features = head.in_features, weight.shape[0]
        self.weight = weight
        self.bias = None if head.bias is None else nn.Parameter(head.bias.detach()[self.rows()].clone(),
                                                                requires_grad=head.bias.requires_grad)

    def full(self):
        """(weight, bias) of the whole head, gathered (evaluation)."""
        bias = None if self.bias is None else gather_rows(self.bias.detach(), self.widths, self.process_group)
        return gather_rows(self.weight.detach(), self.widths, self.process_group), bias


class VocabShardEmbedding(nn.Module, VocabShard):
    """A token embedding tied to a vocabulary-parallel LM head: each rank looks up the ids in its rows (zeros
    for the others') and the ranks' lookups are summed."""

    def __init__(self, weight: nn.Parameter, group, widths):
        super().__init__()
        self._init_shard(group, widths)
        self.weight = weight

    def forward(self, ids):
        local = ids - self.offset
        here = (local >= 0) & (local < self.weight.shape[0])
        vectors = F.embedding(torch.where(here, local, 0), self.weight) * here.unsqueeze(-1)
        return _SumOverRanks.apply(vectors, self.process_group)


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for module in list(model.modules()):
        for child_name, child in module.named_children():
            if child is old:
                setattr(module, child_name, new)


def shard_vocabulary(model: nn.Module, head: nn.Linear, group) -> None:
    """Replaces ``head`` (an nn.Linear of ``model``) by this rank's rows, and an nn.Embedding tied to it by the
    matching vocabulary-parallel lookup."""
    widths = shard_widths(head.weight.shape[0], dist.get_world_size(group))
    rank = dist.get_rank(group)
    rows = slice(sum(widths[:rank]), sum(widths[:rank + 1]))
    weight = nn.Parameter(head.weight.detach()[rows].clone(), requires_grad=head.weight.requires_grad)
    tied = [m for m in model.modules() if isinstance(m, nn.Embedding) and m.weight is head.weight]
    _replace(model, head, VocabShardLinear(head, weight, group, widths))
    for embedding in tied:
        _replace(model, embedding, VocabShardEmbedding(weight, group, widths))


def _sharded_ids(model: nn.Module) -> dict:
    """{id(parameter): its VocabShard module} of the vocabulary-parallel parameters of ``model``."""
    return {id(p): m for m in model.modules() if isinstance(m, VocabShard) for p in m.parameters(recurse=False)}


class Parallel:
    """The mode of a run on ``world`` ranks (one process: nothing to do in any mode)."""

    def __init__(self, mode: str, world: int, device: torch.device):
        self.mode = mode if world > 1 else None
        self.world, self.device = world, device

    def data_shard(self, rank: int) -> tuple[int, int]:
        """(rank, world) of the data: tp gives every rank every batch."""
        return (0, 1) if self.mode == "tp" else (rank, self.world)

    def prepare(self, model: nn.Module, teacher: nn.Module | None, head_of) -> None:
        """Shards the models in place, before the optimizer sees their parameters (``head_of(model)``: the LM
        head)."""
        if self.mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.world,))
            for block in getattr(model, "blocks", ()):
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        elif self.mode == "tp":
            for m in (model, teacher):
                if m is not None:
                    shard_vocabulary(m, head_of(m), dist.group.WORLD)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training steps call."""
        if self.mode != "ddp":
            return model
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def model_state(self, model: nn.Module) -> dict:
        """The whole state dict, on every rank (a collective in fsdp and tp: every rank calls it)."""
        if self.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        if self.mode != "tp":
            return model.state_dict()
        shards = _sharded_ids(model)
        return {k: gather_rows(t.detach(), shards[id(t)].widths, shards[id(t)].process_group) if id(t) in shards
                else t.detach() for k, t in model.state_dict(keep_vars=True).items()}

    def optimizer_state(self, model: nn.Module, optimizer) -> dict:
        """The optimizer's whole state dict, on every rank (a collective in fsdp and tp)."""
        if self.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
        state = optimizer.state_dict()
        if self.mode == "tp":
            state = self._map_sharded_state(model, optimizer, state,
                                            lambda t, shard: gather_rows(t, shard.widths, shard.process_group))
        return state

    def load(self, model: nn.Module, optimizer, model_state: dict, optimizer_state: dict) -> None:
        """Loads whole state dicts (``model_state``, ``optimizer_state``) into the sharded model and optimizer."""
        if self.mode == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                           options=StateDictOptions(full_state_dict=True))
            return
        if self.mode == "tp":
            shards = {name: m for name, m in model.named_modules() if isinstance(m, VocabShard)}
            model_state = {k: (t[shards[k.rsplit(".", 1)[0]].rows()] if k.rsplit(".", 1)[0] in shards else t)
                           for k, t in model_state.items()}
            optimizer_state = self._map_sharded_state(model, optimizer, optimizer_state,
                                                      lambda t, shard: t[shard.rows()])
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)

    @staticmethod
    def _map_sharded_state(model, optimizer, state: dict, fn) -> dict:
        """``state`` (an optimizer state dict) with ``fn(tensor, shard)`` applied to the per-row tensors of the
        vocabulary-parallel parameters (moments, momentum; not the step count)."""
        shards = _sharded_ids(model)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        per_param = dict(state["state"])
        for index, p in enumerate(params):
            shard = shards.get(id(p))
            if shard is not None and index in per_param:
                per_param[index] = {k: fn(t, shard) if torch.is_tensor(t) and t.dim() > 0 else t
                                    for k, t in per_param[index].items()}
        return {**state, "state": per_param}
