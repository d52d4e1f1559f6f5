"""Megatron's pretraining batch sampler: consumed-samples driven, one slice per data-parallel rank."""

from __future__ import annotations

from collections.abc import Iterator

from neox.errors import DataError


class MegatronPretrainingSampler:
    """Yields the sample indices of this rank's micro-batches, in order, from ``consumed_samples`` on.

    Sample indices run 0, 1, 2, ... over the (already shuffled) dataset; each group of
    ``micro_batch_size * data_parallel_size`` consecutive indices is one micro-step of the whole
    data-parallel group, and rank r takes the r-th ``micro_batch_size`` slice of it. A run resumed at
    ``consumed_samples`` therefore sees exactly the batches the uninterrupted run would have.
    Ranks of one tensor/pipeline group pass the same ``data_parallel_rank`` and get the same data.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int, drop_last: bool = True) -> None:
        if total_samples <= 0:
            raise DataError(f"dataset has {total_samples} samples; nothing to sample")
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise DataError(f"micro_batch_size {micro_batch_size} and data_parallel_size "
                            f"{data_parallel_size} must be positive")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise DataError(f"data_parallel_rank {data_parallel_rank} outside [0, {data_parallel_size})")
        if not 0 <= consumed_samples < total_samples:
            raise DataError(f"consumed samples {consumed_samples} is beyond the {total_samples} samples the "
                            "dataset was built for (resuming with a larger train_iters? rebuild the indices)")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.step = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        remaining = self.total_samples - self.consumed_samples
        return remaining // self.step if self.drop_last else -(-remaining // self.step)

    def __iter__(self) -> Iterator[list[int]]:
        lo = self.data_parallel_rank * self.micro_batch_size
        for start in range(self.consumed_samples, self.total_samples, self.step):
            group = range(start, min(start + self.step, self.total_samples))
            if len(group) < self.step and self.drop_last:
                return
            mine = list(group[lo:lo + self.micro_batch_size])
            if mine:
                yield mine
