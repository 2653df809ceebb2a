"""PyTorch definitions of zoo models that are not in torchvision, written from their sources.

- :class:`SlowFastResNet`: PySlowFast's ``ResNet`` builder (``slowfast/models/
  video_model_builder.py``, ``resnet_helper.py``, ``stem_helper.py``, ``head_helper.py``)
  for the config ``Kinetics/c2/I3D_8x8_R50.yaml``, with the same module tree, so its
  ``state_dict`` names are the ``.pyth`` names.
- :class:`VQVAE`: VideoGPT's ``VQVAE`` (``videogpt/vqvae.py``, ``videogpt/attention.py``,
  ``videogpt/utils.py``) without the Lightning training code, so its ``state_dict``
  names are those of a VideoGPT ``.ckpt``.

The Flax models are checked against these; they are not imported by kv3d_jax.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ------------------------------------------------------------------ PySlowFast I3D-R50

_I3D_TEMPORAL_KERNEL = [[[5]], [[3]], [[3, 1]], [[3, 1]], [[1, 3]]]  # _TEMPORAL_KERNEL_BASIS["i3d"]
_I3D_POOL1 = [[2, 1, 1]]  # _POOL1["i3d"]
_STAGE_DEPTH = (3, 4, 6, 3)  # _MODEL_STAGE_DEPTH[50]


class ResNetBasicStem(nn.Module):
    def __init__(self, dim_in, dim_out, kernel, stride, padding, eps=1e-5, bn_mmt=0.1):
        super().__init__()
        self.conv = nn.Conv3d(dim_in, dim_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm3d(dim_out, eps=eps, momentum=bn_mmt)
        self.relu = nn.ReLU(True)
        self.pool_layer = nn.MaxPool3d(kernel_size=[1, 3, 3], stride=[1, 2, 2], padding=[0, 1, 1])

    def forward(self, x):
        return self.pool_layer(self.relu(self.bn(self.conv(x))))


class VideoModelStem(nn.Module):
    def __init__(self, dim_in, dim_out, kernel, stride, padding):
        super().__init__()
        self.num_pathways = len(dim_in)
        for p in range(self.num_pathways):
            self.add_module(f"pathway{p}_stem",
                            ResNetBasicStem(dim_in[p], dim_out[p], kernel[p], stride[p], padding[p]))

    def forward(self, x):
        return [getattr(self, f"pathway{p}_stem")(x[p]) for p in range(self.num_pathways)]


class BottleneckTransform(nn.Module):
    def __init__(self, dim_in, dim_out, temp_kernel_size, stride, dim_inner, num_groups,
                 stride_1x1=False, eps=1e-5, bn_mmt=0.1, dilation=1):
        super().__init__()
        str1x1, str3x3 = (stride, 1) if stride_1x1 else (1, stride)
        self.a = nn.Conv3d(dim_in, dim_inner, kernel_size=[temp_kernel_size, 1, 1],
                           stride=[1, str1x1, str1x1], padding=[temp_kernel_size // 2, 0, 0], bias=False)
        self.a_bn = nn.BatchNorm3d(dim_inner, eps=eps, momentum=bn_mmt)
        self.a_relu = nn.ReLU(True)
        self.b = nn.Conv3d(dim_inner, dim_inner, [1, 3, 3], stride=[1, str3x3, str3x3],
                           padding=[0, dilation, dilation], groups=num_groups, bias=False,
                           dilation=[1, dilation, dilation])
        self.b_bn = nn.BatchNorm3d(dim_inner, eps=eps, momentum=bn_mmt)
        self.b_relu = nn.ReLU(True)
        self.c = nn.Conv3d(dim_inner, dim_out, kernel_size=[1, 1, 1], bias=False)
        self.c_bn = nn.BatchNorm3d(dim_out, eps=eps, momentum=bn_mmt)

    def forward(self, x):
        x = self.a_relu(self.a_bn(self.a(x)))
        x = self.b_relu(self.b_bn(self.b(x)))
        return self.c_bn(self.c(x))


class ResBlock(nn.Module):
    def __init__(self, dim_in, dim_out, temp_kernel_size, stride, dim_inner, num_groups=1,
                 stride_1x1=False, eps=1e-5, bn_mmt=0.1):
        super().__init__()
        if dim_in != dim_out or stride != 1:
            self.branch1 = nn.Conv3d(dim_in, dim_out, kernel_size=1, stride=[1, stride, stride],
                                     padding=0, bias=False)
            self.branch1_bn = nn.BatchNorm3d(dim_out, eps=eps, momentum=bn_mmt)
        self.branch2 = BottleneckTransform(dim_in, dim_out, temp_kernel_size, stride, dim_inner,
                                           num_groups, stride_1x1=stride_1x1)
        self.relu = nn.ReLU(True)

    def forward(self, x):
        if hasattr(self, "branch1"):
            x = self.branch1_bn(self.branch1(x)) + self.branch2(x)
        else:
            x = x + self.branch2(x)
        return self.relu(x)


class ResStage(nn.Module):
    def __init__(self, dim_in, dim_out, stride, temp_kernel_sizes, num_blocks, dim_inner,
                 num_groups, num_block_temp_kernel, stride_1x1=False):
        super().__init__()
        self.num_blocks = num_blocks
        self.temp_kernel_sizes = [
            (temp_kernel_sizes[i] * num_blocks[i])[: num_block_temp_kernel[i]]
            + [1] * (num_blocks[i] - num_block_temp_kernel[i])
            for i in range(len(temp_kernel_sizes))
        ]
        self.num_pathways = len(num_blocks)
        for p in range(self.num_pathways):
            for i in range(num_blocks[p]):
                self.add_module(f"pathway{p}_res{i}", ResBlock(
                    dim_in[p] if i == 0 else dim_out[p], dim_out[p], self.temp_kernel_sizes[p][i],
                    stride[p] if i == 0 else 1, dim_inner[p], num_groups[p], stride_1x1=stride_1x1))

    def forward(self, inputs):
        out = []
        for p in range(self.num_pathways):
            x = inputs[p]
            for i in range(self.num_blocks[p]):
                x = getattr(self, f"pathway{p}_res{i}")(x)
            out.append(x)
        return out


class ResNetBasicHead(nn.Module):
    """The parameters of PySlowFast's head (``projection``); the pooling is not needed here."""

    def __init__(self, dim_in, num_classes):
        super().__init__()
        self.projection = nn.Linear(sum(dim_in), num_classes, bias=True)


class SlowFastResNet(nn.Module):
    """PySlowFast ``ResNet`` with ``MODEL.ARCH: i3d``, ``RESNET.DEPTH: 50``, ``WIDTH_PER_GROUP: 64``,
    ``NUM_GROUPS: 1``, ``STRIDE_1X1: False``, ``NUM_BLOCK_TEMP_KERNEL: [[3], [4], [6], [3]]``,
    default ``SPATIAL_STRIDES`` ``[[1], [2], [2], [2]]``, no non-local blocks, 400 classes.
    ``forward`` runs the trunk (up to ``s5``)."""

    def __init__(self, num_classes=400):
        super().__init__()
        w, tk = 64, _I3D_TEMPORAL_KERNEL
        d2, d3, d4, d5 = _STAGE_DEPTH
        self.s1 = VideoModelStem([3], [w], [tk[0][0] + [7, 7]], [[1, 2, 2]], [[tk[0][0][0] // 2, 3, 3]])
        self.s2 = ResStage([w], [w * 4], [1], tk[1], [d2], [w], [1], [3])
        self.pathway0_pool = nn.MaxPool3d(kernel_size=_I3D_POOL1[0], stride=_I3D_POOL1[0], padding=[0, 0, 0])
        self.s3 = ResStage([w * 4], [w * 8], [2], tk[2], [d3], [w * 2], [1], [4])
        self.s4 = ResStage([w * 8], [w * 16], [2], tk[3], [d4], [w * 4], [1], [6])
        self.s5 = ResStage([w * 16], [w * 32], [2], tk[4], [d5], [w * 8], [1], [3])
        self.head = ResNetBasicHead([w * 32], num_classes)

    def forward(self, x):
        x = self.s2(self.s1([x]))
        x = [self.pathway0_pool(x[0])]
        return self.s5(self.s4(self.s3(x)))[0]


def caffe2_blob_name(torch_name: str) -> str:
    """Inverse of PySlowFast's Caffe2 -> PyTorch renaming for the I3D tensors, to write
    synthetic ``.pkl`` files (``s2.pathway0_res0.branch2.a_bn.weight`` -> ``res2_0_branch2a_bn_s``)."""
    module, leaf = torch_name.rsplit(".", 1)
    if module == "head.projection":
        return {"weight": "pred_w", "bias": "pred_b"}[leaf]
    is_bn = module.endswith("bn")
    suffix = ({"weight": "s", "bias": "b", "running_mean": "rm", "running_var": "riv"} if is_bn
              else {"weight": "w", "bias": "b"})[leaf]
    if module == "s1.pathway0_stem.conv":
        return f"conv1_{suffix}"
    if module == "s1.pathway0_stem.bn":
        return f"res_conv1_bn_{suffix}"
    stage, unit, rest = module.split(".", 2)
    block = unit[len("pathway0_res"):]
    rest = rest.replace("branch2.", "branch2")  # branch2.a_bn -> branch2a_bn
    return f"res{stage[1:]}_{block}_{rest}_{suffix}"


# ------------------------------------------------------------------ VideoGPT VQ-VAE


def shift_dim(x, src_dim=-1, dest_dim=-1):
    """VideoGPT's ``utils.shift_dim``: move ``src_dim`` to ``dest_dim``."""
    n_dims = len(x.shape)
    src_dim, dest_dim = src_dim % n_dims, dest_dim % n_dims
    dims = list(range(n_dims))
    del dims[src_dim]
    permutation, ctr = [], 0
    for i in range(n_dims):
        if i == dest_dim:
            permutation.append(src_dim)
        else:
            permutation.append(dims[ctr])
            ctr += 1
    return x.permute(permutation).contiguous()


def view_range(x, i, j, shape):
    """VideoGPT's ``utils.view_range``: reshape dims ``i:j`` to ``shape``."""
    n_dims = len(x.shape)
    i = i % n_dims
    j = n_dims if j is None else j % n_dims
    return x.view(x.shape[:i] + tuple(shape) + x.shape[j:])


def scaled_dot_product_attention(q, k, v):
    attn = torch.matmul(q, k.transpose(-1, -2)) / np.sqrt(q.shape[-1])
    return torch.matmul(F.softmax(attn, dim=-1), v)


class AxialAttention(nn.Module):
    def __init__(self, n_dim, axial_dim):
        super().__init__()
        self.axial_dim = 2 + n_dim + 1 + axial_dim if axial_dim < 0 else axial_dim + 2

    def forward(self, q, k, v):
        q = shift_dim(q, self.axial_dim, -2).flatten(end_dim=-3)
        k = shift_dim(k, self.axial_dim, -2).flatten(end_dim=-3)
        v = shift_dim(v, self.axial_dim, -2)
        old_shape = list(v.shape)
        v = v.flatten(end_dim=-3)
        out = scaled_dot_product_attention(q, k, v).view(*old_shape)
        return shift_dim(out, -2, self.axial_dim)


class MultiHeadAttention(nn.Module):
    """VideoGPT's ``MultiHeadAttention`` with ``attn_type='axial'``, non-causal, no decoding cache."""

    def __init__(self, shape, dim_q, dim_kv, n_head, n_layer, axial_dim):
        super().__init__()
        self.d_k, self.d_v, self.n_head = dim_q // n_head, dim_kv // n_head, n_head
        self.w_qs = nn.Linear(dim_q, n_head * self.d_k, bias=False)
        self.w_ks = nn.Linear(dim_kv, n_head * self.d_k, bias=False)
        self.w_vs = nn.Linear(dim_kv, n_head * self.d_v, bias=False)
        self.fc = nn.Linear(n_head * self.d_v, dim_q, bias=True)
        self.attn = AxialAttention(len(shape), axial_dim)

    def forward(self, q, k, v):
        q = shift_dim(view_range(self.w_qs(q), -1, None, (self.n_head, self.d_k)), -2, 1)
        k = shift_dim(view_range(self.w_ks(k), -1, None, (self.n_head, self.d_k)), -2, 1)
        v = shift_dim(view_range(self.w_vs(v), -1, None, (self.n_head, self.d_v)), -2, 1)
        a = self.attn(q, k, v)
        return self.fc(shift_dim(a, 1, -2).flatten(start_dim=-2))


class AxialBlock(nn.Module):
    def __init__(self, n_hiddens, n_head):
        super().__init__()
        kwargs = dict(shape=(0,) * 3, dim_q=n_hiddens, dim_kv=n_hiddens, n_head=n_head, n_layer=1)
        self.attn_w = MultiHeadAttention(axial_dim=-2, **kwargs)
        self.attn_h = MultiHeadAttention(axial_dim=-3, **kwargs)
        self.attn_t = MultiHeadAttention(axial_dim=-4, **kwargs)

    def forward(self, x):
        x = shift_dim(x, 1, -1)
        x = self.attn_w(x, x, x) + self.attn_h(x, x, x) + self.attn_t(x, x, x)
        return shift_dim(x, -1, 1)


class SamePadConv3d(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, bias=True):
        super().__init__()
        kernel_size = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        stride = (stride,) * 3 if isinstance(stride, int) else stride
        total_pad = tuple(k - s for k, s in zip(kernel_size, stride))
        self.pad_input = sum(((p // 2 + p % 2, p // 2) for p in total_pad[::-1]), ())
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=0, bias=bias)

    def forward(self, x):
        return self.conv(F.pad(x, self.pad_input))


class SamePadConvTranspose3d(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, bias=True):
        super().__init__()
        kernel_size = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        stride = (stride,) * 3 if isinstance(stride, int) else stride
        total_pad = tuple(k - s for k, s in zip(kernel_size, stride))
        self.pad_input = sum(((p // 2 + p % 2, p // 2) for p in total_pad[::-1]), ())
        self.convt = nn.ConvTranspose3d(in_channels, out_channels, kernel_size, stride=stride,
                                        bias=bias, padding=tuple(k - 1 for k in kernel_size))

    def forward(self, x):
        return self.convt(F.pad(x, self.pad_input))


class AttentionResidualBlock(nn.Module):
    def __init__(self, n_hiddens):
        super().__init__()
        self.block = nn.Sequential(
            nn.BatchNorm3d(n_hiddens), nn.ReLU(),
            SamePadConv3d(n_hiddens, n_hiddens // 2, 3, bias=False),
            nn.BatchNorm3d(n_hiddens // 2), nn.ReLU(),
            SamePadConv3d(n_hiddens // 2, n_hiddens, 1, bias=False),
            nn.BatchNorm3d(n_hiddens), nn.ReLU(),
            AxialBlock(n_hiddens, 2),
        )

    def forward(self, x):
        return x + self.block(x)


class Encoder(nn.Module):
    def __init__(self, n_hiddens, n_res_layers, downsample):
        super().__init__()
        n_times_downsample = np.array([int(math.log2(d)) for d in downsample])
        self.convs = nn.ModuleList()
        for i in range(n_times_downsample.max()):
            in_channels = 3 if i == 0 else n_hiddens
            stride = tuple(2 if d > 0 else 1 for d in n_times_downsample)
            self.convs.append(SamePadConv3d(in_channels, n_hiddens, 4, stride=stride))
            n_times_downsample -= 1
        self.conv_last = SamePadConv3d(in_channels, n_hiddens, kernel_size=3)
        self.res_stack = nn.Sequential(*[AttentionResidualBlock(n_hiddens) for _ in range(n_res_layers)],
                                       nn.BatchNorm3d(n_hiddens), nn.ReLU())

    def forward(self, x):
        h = x
        for conv in self.convs:
            h = F.relu(conv(h))
        return self.res_stack(self.conv_last(h))


class Decoder(nn.Module):
    def __init__(self, n_hiddens, n_res_layers, upsample):
        super().__init__()
        self.res_stack = nn.Sequential(*[AttentionResidualBlock(n_hiddens) for _ in range(n_res_layers)],
                                       nn.BatchNorm3d(n_hiddens), nn.ReLU())
        n_times_upsample = np.array([int(math.log2(d)) for d in upsample])
        max_us = n_times_upsample.max()
        self.convts = nn.ModuleList()
        for i in range(max_us):
            out_channels = 3 if i == max_us - 1 else n_hiddens
            us = tuple(2 if d > 0 else 1 for d in n_times_upsample)
            self.convts.append(SamePadConvTranspose3d(n_hiddens, out_channels, 4, stride=us))
            n_times_upsample -= 1


class Codebook(nn.Module):
    def __init__(self, n_codes, embedding_dim):
        super().__init__()
        self.register_buffer("embeddings", torch.randn(n_codes, embedding_dim))
        self.register_buffer("N", torch.zeros(n_codes))
        self.register_buffer("z_avg", self.embeddings.data.clone())


class VQVAE(nn.Module):
    """VideoGPT's ``VQVAE`` module tree (defaults of ``add_model_specific_args``); ``forward`` is the encoder."""

    def __init__(self, embedding_dim=256, n_codes=2048, n_hiddens=240, n_res_layers=4, downsample=(4, 4, 4)):
        super().__init__()
        self.encoder = Encoder(n_hiddens, n_res_layers, downsample)
        self.decoder = Decoder(n_hiddens, n_res_layers, downsample)
        self.pre_vq_conv = SamePadConv3d(n_hiddens, embedding_dim, 1)
        self.post_vq_conv = SamePadConv3d(embedding_dim, n_hiddens, 1)
        self.codebook = Codebook(n_codes, embedding_dim)

    def forward(self, x):
        return self.encoder(x)


def randomize_batch_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Gives every BatchNorm non-trivial affine parameters and running statistics, so that
    eval-mode BN is tested (fresh BNs are the identity up to eps)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=generator))
                m.bias.copy_(0.2 * torch.randn(c, generator=generator))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(c, generator=generator))
