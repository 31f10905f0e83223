"""nn.BatchNorm2d's batch-statistics forward and backward as one op each,
`ghostkernels::batch_norm_train`: what accelerate() gives the BNs a training model keeps outside
its Ghost modules (a Ghost-ResNet's bn1/bn2 after each Ghost module, GhostNet's shortcut and
stride-2 BNs). The C++ CPU kernels (csrc/batch_norm_cpu.cpp) serve float32/float64; elsewhere
the composition below runs. TrainingBatchNorm2d is the module: an nn.BatchNorm2d (same
parameters, buffers and keys) that calls the op where the kernel applies, with the running
statistics nn.BatchNorm2d would give F.batch_norm, which the op updates in place.
"""

import torch
from torch import nn

from . import _backends, ops
from .ghost_train import check_both_or_neither, running_statistics, update_running_statistics_, uses_batch_statistics
from .reference import batch_norm_backward, output_memory_format

_lib = torch.library.Library("ghostkernels", "FRAGMENT")
# (out, batch mean, biased batch variance); the running statistics given updated in place
_lib.define("batch_norm_train(Tensor x, Tensor weight, Tensor bias, float eps, Tensor(a!)? running_mean=None, "
            "Tensor(b!)? running_var=None, float momentum=0.1) -> (Tensor, Tensor, Tensor)")
# (grad_x, grad_weight, grad_bias) given the forward's mean and biased variance
_lib.define("batch_norm_train_backward(Tensor grad, Tensor x, Tensor weight, Tensor mean, Tensor var, float eps) "
            "-> (Tensor, Tensor, Tensor)")

# Fewer elements go to nn.BatchNorm2d: the op's Python path (autograd function, running
# statistics) costs about 100 us a forward and backward more than ATen's (2 threads: (8, 64, 8, 8)
# 154 vs 92 us, (64, 64, 8, 8) 379 vs 404, (16, 64, 14, 14) 285 vs 489).
SMALLEST_KERNEL_MAP = 1 << 17

_DIMS = (0, 2, 3)
_SHAPE = (1, -1, 1, 1)


def _check(x, **channel_vectors):
    """The C++ kernels' argument errors, raised before anything runs."""
    if x.dim() != 4:
        raise RuntimeError(f"batch_norm_train: x must be a 4-D tensor (N, C, H, W), got {tuple(x.shape)}")
    for name, t in channel_vectors.items():
        if tuple(t.shape) != (x.shape[1],):
            raise RuntimeError(f"batch_norm_train: {name} must have shape ({x.shape[1]},), got {tuple(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise RuntimeError(f"batch_norm_train: {name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}; "
                               "they must match")
    if x.numel() // max(x.shape[1], 1) <= 1:
        raise RuntimeError("batch_norm_train: expected more than 1 value per channel when training, got input size "
                           f"{tuple(x.shape)}")


def _running(running_mean, running_var):
    """The running statistics given (both or neither), by name, for _check."""
    check_both_or_neither("batch_norm_train", "", running_mean, running_var, RuntimeError)
    return {} if running_mean is None else {"running_mean": running_mean, "running_var": running_var}


@torch.library.register_fake("ghostkernels::batch_norm_train")
def _fake(x, weight, bias, eps, running_mean=None, running_var=None, momentum=0.1):
    _check(x, weight=weight, bias=bias, **_running(running_mean, running_var))
    channels = x.shape[1]
    return torch.empty_like(x, memory_format=output_memory_format(x)), x.new_empty(channels), x.new_empty(channels)


@torch.library.impl(_lib, "batch_norm_train", "CompositeExplicitAutograd")
def _fallback(x, weight, bias, eps, running_mean=None, running_var=None, momentum=0.1):
    _check(x, weight=weight, bias=bias, **_running(running_mean, running_var))
    var, mean = torch.var_mean(x, dim=_DIMS, correction=0)
    update_running_statistics_(running_mean, running_var, mean, var, momentum, x.numel() // x.shape[1])
    scale = weight * torch.rsqrt(var + eps)
    # (x - mean) * scale + bias, as the C++ kernel: a folded shift loses digits where |mean| >> std
    out = (x - mean.view(_SHAPE)) * scale.view(_SHAPE) + bias.view(_SHAPE)
    return out.contiguous(memory_format=output_memory_format(x)), mean, var


def _check_backward(grad, x, weight, mean, var):
    _check(x, weight=weight, mean=mean, var=var)
    if grad.shape != x.shape:
        raise RuntimeError(f"batch_norm_train_backward: grad must have x's shape {list(x.shape)}, got {list(grad.shape)}")


@torch.library.register_fake("ghostkernels::batch_norm_train_backward")
def _backward_fake(grad, x, weight, mean, var, eps):
    _check_backward(grad, x, weight, mean, var)
    return torch.empty_like(x, memory_format=output_memory_format(x)), torch.empty_like(weight), \
        torch.empty_like(weight)


@torch.library.impl(_lib, "batch_norm_train_backward", "CompositeExplicitAutograd")
def _backward_fallback(grad, x, weight, mean, var, eps):
    _check_backward(grad, x, weight, mean, var)
    grad_x, grad_weight, grad_bias = batch_norm_backward(grad, x, weight, mean, var, eps)
    return grad_x.contiguous(memory_format=output_memory_format(x)), grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    x, weight, _, eps = inputs[:4]
    _, mean, var = output
    ctx.save_for_backward(x, weight, mean, var)
    ctx.eps = eps
    ctx.mark_non_differentiable(mean, var)
    ctx.set_materialize_grads(False)  # no zero-filled grads for mean and var


def _output_of_fallback(x, weight, bias, eps):
    return _fallback(x, weight, bias, eps)[0]


def _backward(ctx, grad, *_):
    """Grads of x, weight and bias (ops.register_autograd_updating_statistics gives the other
    arguments None)."""
    if grad is None:  # only mean or var were used
        return None, None, None
    x, weight, mean, var = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: grads differentiable again, through the composition
        # bias is not saved: it shifts the output, so any value (zeros) gives its grad
        grads = ops.gradients_with_graph(ctx, grad, _output_of_fallback, (x, weight, torch.zeros_like(weight), ctx.eps))
        return grads[0], grads[1], grads[2]
    grad_x, grad_weight, grad_bias = torch.ops.ghostkernels.batch_norm_train_backward(grad, x, weight, mean, var,
                                                                                      ctx.eps)
    needs = ctx.needs_input_grad
    return grad_x if needs[0] else None, grad_weight if needs[1] else None, grad_bias if needs[2] else None


ops.register_autograd_updating_statistics("batch_norm_train", _backward, _setup_context)


class TrainingBatchNorm2d(nn.BatchNorm2d):
    """An nn.BatchNorm2d whose batch-statistics forward and backward run on
    ghostkernels::batch_norm_train for NCHW-contiguous CPU float32/float64 maps of at least
    SMALLEST_KERNEL_MAP elements (affine, not under autocast); everything else, running-statistics
    normalisation (eval mode) included, is nn.BatchNorm2d's own. from_batch_norm shares the original's Parameter and buffer objects:
    keys, checkpoints and optimiser state carry over."""

    __prepare_scriptable__ = ops.refuse_torchscript

    @staticmethod
    def eligible(bn):
        return type(bn) is nn.BatchNorm2d

    @classmethod
    def from_batch_norm(cls, bn):
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, device="meta")
        for name in (*bn._parameters, *bn._buffers):
            setattr(new, name, getattr(bn, name))
        return new.train(bn.training)

    def _kernel_applies(self, x):
        return (self.affine and uses_batch_statistics(self) and x.dim() == 4 and x.device.type == "cpu"
                and ops.cpu_kernel_takes(x) and x.is_contiguous()
                and x.numel() >= SMALLEST_KERNEL_MAP
                and x.numel() > x.shape[1]  # torch's "more than 1 value per channel" error, and batch 0
                and not torch.is_autocast_enabled("cpu") and not ops.onnx_exporting()
                and _backends.load_cpu_extension()[0] == "cpp")

    def forward(self, x):
        if not self._kernel_applies(x):
            return super().forward(x)
        return ops.call(torch.ops.ghostkernels.batch_norm_train, x, self.weight, self.bias, self.eps,
                        *running_statistics(self))[0]


class FoldedBatchNorm(nn.BatchNorm2d):
    """What takes a BatchNorm's place once an eval-mode accelerate() has folded it into the conv
    before it: the modules that ran after its normalisation (timm's BatchNormAct2d: drop, act),
    and no parameters or buffers (its values live in the conv). Still an nn.BatchNorm2d, so that
    code looking for the model's BNs finds it: test-time adaptation puts each BN it finds in
    training mode, where the original normalises with batch statistics, which the folded conv
    cannot; a forward there raises instead of giving another model's outputs. A state dict that
    holds the BN's values but not what OriginalStateDicts needs to fold them into the conv again
    (the conv's weight) cannot be loaded, even with strict=False, which would drop them silently."""

    _BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    __prepare_scriptable__ = ops.refuse_torchscript
    # Class-level defaults: instances pickled before these attributes existed load with them.
    conv_attribute = None  # the folded conv's attribute in the module that holds both
    orphaned = False  # that conv has since been replaced, and the BN's values with it

    def __init__(self, num_features, tail, folded_into, conv_attribute=None):
        super().__init__(num_features, affine=False, track_running_stats=False)
        for index, module in enumerate(tail):  # the keys of the nn.Sequential this class once was
            self.add_module(str(index), module)
        self.folded_into = folded_into
        self.conv_attribute = conv_attribute
        # Not None, which converters (convert_sync_batchnorm) would copy into a BN that normalises
        # by batch statistics, silently: assigning this to a buffer raises a TypeError naming it
        del self._buffers["running_mean"], self._buffers["running_var"]
        self.running_mean = self.running_var = StatisticsFoldedIntoConv(folded_into)
        self.eval()  # folds happen in eval mode only

    @property
    def passes_through(self):
        """Whether its forward returns its input."""
        return not self._modules and not self.training

    def forward(self, x):
        if self.training:
            raise RuntimeError(
                f"ghostkernels.accelerate() folded the BatchNorm after {self.folded_into} into it, the model being in "
                "eval mode; in training mode (model.train(), or a BatchNorm put back in training mode for test-time "
                "adaptation) the original normalises with batch statistics, which the folded model cannot. To train "
                "the model, accelerate it in training mode; to adapt its BatchNorms, put them in training mode before "
                "accelerate() (it keeps them); for inference, call eval() on this one")
        if self.orphaned:
            raise RuntimeError(
                f"ghostkernels.accelerate() folded this BatchNorm into {self.folded_into}, which has since been "
                "replaced or removed, and the BN's values went with it: put a module of its own in this BN's place too "
                "(the original BatchNorm, say), or edit the original model and accelerate it again")
        for module in self._modules.values():
            x = module(x)
        return x

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if any(prefix + key in state_dict for key in self._BN_KEYS):
            error_msgs.append(
                f"{prefix}*: the state dict holds this BatchNorm's values, but ghostkernels.accelerate() folded it "
                f"into {self.folded_into} (an eval-mode acceleration) and the state dict lacks that conv's weight "
                "to fold them into: load the whole checkpoint, or load it into the original model and accelerate "
                "that")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self):
        return f"folded into {self.folded_into}"

    def conv_renamed(self, conv_attribute):
        """Its conv now has this attribute in the module that holds both (a FoldedSequential renumbered)."""
        self.conv_attribute = conv_attribute
        owner, dot, _ = self.folded_into.rpartition(".")
        self.folded_into = owner + dot + conv_attribute
        self.running_mean.conv = self.folded_into


class FoldedSequential(nn.Sequential):
    """What an nn.Sequential becomes once accelerate() has folded a BN in it into the conv before
    it: the same modules, keys, repr and forward. Its edits that move modules (insert, del, pop)
    write its module dict directly, where no module registration hook sees them
    (acceleration.check_reassignment), so here they keep each folded pair right or say why not: a
    module inserted between a folded conv and its BN, or the BN removed while the conv stays, would
    leave the BN's values in the conv, and is refused; the conv removed takes the values with it,
    so the BN raises if it runs; the pairs' names follow the renumbering."""

    def _get_name(self):
        return "Sequential"

    def _folded_pairs(self):
        """[(conv, FoldedBatchNorm)] of the pairs that still hold the BN's values, the BN right after its conv."""
        items = list(self._modules.items())
        return [(conv, bn) for (conv_key, conv), (_, bn) in zip(items, items[1:])
                if type(bn) is FoldedBatchNorm and bn.conv_attribute == conv_key and not bn.orphaned]

    def _check_removal(self, pairs, removed):
        for conv, bn in pairs:
            if any(m is bn for m in removed) and not any(m is conv for m in removed):
                raise RuntimeError(
                    f"ghostkernels.accelerate() folded this BatchNorm into {bn.folded_into}, whose weights now hold "
                    "its values: removing the BN alone would leave them there. Remove or replace the conv first, or "
                    "edit the original model and accelerate it again")
        for conv, bn in pairs:
            if any(m is conv for m in removed):
                bn.orphaned = True

    def _renumber(self, pairs):
        keys = {id(module): key for key, module in self._modules.items()}
        for conv, bn in pairs:
            if not bn.orphaned and id(conv) in keys:
                bn.conv_renamed(keys[id(conv)])

    def insert(self, index, module):
        pairs, modules = self._folded_pairs(), list(self._modules.values())
        position = index + len(modules) if index < 0 else index
        if 0 <= position < len(modules) and any(modules[position] is bn for _, bn in pairs):
            raise RuntimeError(
                f"ghostkernels.accelerate() folded the BatchNorm at index {position} of this Sequential into the conv "
                "before it: a module inserted between them would run after the BN, which the conv applies. Edit the "
                "original model and accelerate it again")
        super().insert(index, module)
        self._renumber(pairs)
        return self

    def __delitem__(self, idx):
        pairs = self._folded_pairs()
        modules = list(self._modules.values())
        try:
            removed = modules[idx] if isinstance(idx, slice) else [modules[idx]]
        except (IndexError, TypeError):
            removed = []  # nn.Sequential raises its error
        self._check_removal(pairs, removed)
        super().__delitem__(idx)
        self._renumber(pairs)

    def __delattr__(self, name):
        if name in self._modules:
            self._check_removal(self._folded_pairs(), [self._modules[name]])
        super().__delattr__(name)


class StatisticsFoldedIntoConv:
    """A FoldedBatchNorm's running_mean and running_var: they live in the weights of the conv
    named here."""

    def __init__(self, conv):
        self.conv = conv

    def __repr__(self):
        return f"StatisticsFoldedIntoConv({self.conv!r})"
