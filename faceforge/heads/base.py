"""What every head shares: the `HEADS` registry, the written contract between the trainer and a head,
and the helpers of the chunked kernels.

A head is an `nn.Module` called as ``loss = head(embeddings (B, D), labels (B,))`` that owns its class
proxies (pytorch-metric-learning's convention). `heads.build(name, **kwargs)` makes a registered one.
"""

from __future__ import annotations

from torch import nn

from faceforge.registry import Registry

HEADS: Registry[nn.Module] = Registry("head")


# ----------------------------------------------------------------------------------------------------------
# The contract between the trainer and a head (protocols)


# ----------------------------------------------------------------------------------------------------------
# End of the contract.
#
# Below: helpers shared by the chunked kernels (softmax.py, sphereface2.py, broadface.py).
#


# ----------------------------------------------------------------------------------------------------------
# Chunked-kernel helpers
