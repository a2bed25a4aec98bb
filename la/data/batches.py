"""What both sources' training loaders share: an epoch's seeded plan of global batches, each rank's shard of it,
the sampler that hands a plan to a DataLoader, and the uint8 -> float scaling on the device."""
import torch

MEAN = (0.4914, 0.4822, 0.4465)  # CIFAR-10's, Normalize's default (la.data.folder passes ImageNet's)
STD = (0.2470, 0.2435, 0.2616)


def epoch_generator(seed, epoch):
    """Every rank draws the same permutation and augmentation for an epoch, and resuming re-draws them."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def epoch_plan(n, batch_size, world_size, seed, epoch, drop_last=False):
    """The epoch's permutation cut into global batches; a short last batch is cut to a multiple of world_size, or
    with drop_last dropped (n // batch_size batches, as tf.data's batch(drop_remainder=True))."""
    perm = torch.randperm(n, generator=epoch_generator(seed, epoch))
    batches = [perm[i:i + batch_size] for i in range(0, n, batch_size)]
    tail = 0 if drop_last and len(batches[-1]) < batch_size else len(batches[-1]) // world_size * world_size
    batches[-1] = batches[-1][:tail]
    return [b for b in batches if len(b)]


def shard(batch, rank, world_size):
    per_rank = len(batch) // world_size
    return batch[rank * per_rank:(rank + 1) * per_rank]


class Normalize:
    """uint8 -> float in the memory format the model wants, as data.normalize says: 'mean_std', per-channel mean and
    std (CIFAR's unless told others: a folder dataset passes ImageNet's); 'center', x * (1 / 255) - 0.5, the authors'
    TF code's scaling (logit_adjustment/utils.py).

    `scales_first`: augmentation pads the scaled image (with zeros, a mid-grey pixel), as that TF code pads after
    scaling; otherwise it pads the uint8 image with black pixels, as torchvision's RandomCrop pads a PIL image."""

    def __init__(self, device, channels_last, kind="mean_std", mean=MEAN, std=STD):
        self.kind, self.scales_first = kind, kind == "center"
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x):
        x = x.contiguous(memory_format=self.memory_format)
        if self.kind == "center":
            return x.float() * (1.0 / 255) - 0.5
        return (x.float() - self.mean) * self.inv_std


class Planned:
    """An epoch's plan of batches (epoch_plan) from the loader's n, batch_size, world_size, seed and drop_last."""

    def plan(self, epoch):
        return epoch_plan(self.n, self.batch_size, self.world_size, self.seed, epoch, self.drop_last)

    def steps(self, epoch):
        return len(self.plan(epoch))


class PlanSampler(torch.utils.data.Sampler):
    """This rank's (key, index) items of an epoch plan, in order, for a DataLoader with batch_size=per-rank batch;
    key is the epoch the augmentation is drawn for. set() before each pass (a persistent worker pool keeps one)."""
    items = ()

    def set(self, plan, rank, world_size, key):
        self.items = [(key, int(i)) for b in plan for i in shard(b, rank, world_size)]
        return self

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)
