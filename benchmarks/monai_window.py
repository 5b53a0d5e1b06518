"""Time MONAI's ``lung_nodule_ct_detection`` network on whole 512×512×192 sliding windows (CPU, random weights).

Runs in ``benchmarks/.venv-monai`` (``setup_monai_env.sh``) with ``benchmarks/monai_stub`` on ``PYTHONPATH``;
``benchmark.py`` starts it. The network is built as the bundle's ``inference.json`` builds it: a 3D ResNet50
backbone (bottleneck blocks, layers 3-4-6-3, one input channel, first convolution 7×7×7 with stride 2×2×1),
a feature pyramid on returned layers 1 and 2, and RetinaNet heads for one class and three anchor shapes.
Weights are random (seeded): the time of a forward pass does not depend on them. Each window is one forward
pass in eval mode without gradients, as the bundle's sliding-window inferer runs it (batch 1); the
detector's box decoding and NMS after the network are not timed, so the figures understate MONAI's time.

Prints one JSON object: seconds per window, peak RSS (bytes) of this process, versions, threads.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch
from monai.apps.detection.networks.retinanet_network import RetinaNet, resnet_fpn_feature_extractor
from monai.networks.nets import resnet

#: The bundle's settings (configs/inference.json of lung_nodule_ct_detection).
WINDOW_XYZ = (512, 512, 192)
RETURNED_LAYERS = [1, 2]
BASE_ANCHOR_SHAPES = [[6, 8, 4], [8, 6, 5], [10, 10, 6]]
SIZE_DIVISIBLE = [16, 16, 8]


def build_network() -> torch.nn.Module:
    """The bundle's RetinaNet (3D ResNet50-FPN), random weights, eval mode."""
    backbone = resnet.ResNet(
        block=resnet.ResNetBottleneck, layers=[3, 4, 6, 3], block_inplanes=resnet.get_inplanes(),
        n_input_channels=1, conv1_t_stride=[2, 2, 1], conv1_t_size=[7, 7, 7],
    )
    extractor = resnet_fpn_feature_extractor(backbone, 3, pretrained_backbone=False, returned_layers=RETURNED_LAYERS,
                                             trainable_backbone_layers=None)
    net = RetinaNet(spatial_dims=3, num_classes=1, num_anchors=len(BASE_ANCHOR_SHAPES), feature_extractor=extractor,
                    size_divisible=SIZE_DIVISIBLE)
    return net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=1, help="whole windows to time (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    net = build_network()
    params = sum(p.numel() for p in net.parameters())
    # A window of CT intensities scaled to [0, 1] (HU window [-1024, 300]); the content does not change the time.
    window = torch.rand(1, 1, *WINDOW_XYZ)
    seconds = []
    with torch.no_grad():
        for _ in range(args.windows):
            t0 = time.perf_counter()
            net(window)
            seconds.append(time.perf_counter() - t0)
    import monai

    print(json.dumps({
        "window_xyz": list(WINDOW_XYZ), "seconds_per_window": seconds, "parameters": params,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "threads": threads,
        "torch": torch.__version__, "monai": monai.__version__,
    }))


if __name__ == "__main__":
    main()
