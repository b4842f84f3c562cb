"""Micro-benchmark (session 30): one Phase II training step of the proxy tower + head (SGD, CE, batches of
38-64 as the clean rows make them), eager against torch.compile(dynamic=True), one thread.

    python benchmarks/runs/issue11/compile-step-s30.py eager|compile
"""
import time, torch, sys
torch.set_num_threads(1)
from coft.backbone import load_backbone
from coft.phase2 import fresh_classifier
from coft.config import Phase2Config
bb = load_backbone("proxy", device="cpu")
size = bb.preprocess_cfg["size"]; size = size if isinstance(size, int) else size[0]
text = torch.nn.functional.normalize(torch.randn(10, bb.model_cfg["embed_dim"]), dim=-1)
def make():
    torch.manual_seed(0)
    m = fresh_classifier(bb, text, Phase2Config()); m.train()
    return m, torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
def step(m, opt, x, y):
    loss = torch.nn.functional.cross_entropy(m(x), y); opt.zero_grad(); loss.backward(); opt.step(); return loss
sizes = [64, 45, 40, 50, 47, 64, 38]
data = [(torch.randn(b, 3, size, size), torch.randint(0, 10, (b,))) for b in sizes]
mode = sys.argv[1]
m, opt = make()
if mode != "eager":
    m = torch.compile(m, dynamic=True)
t0 = time.perf_counter()
for x, y in data[:3]: step(m, opt, x, y)
warm = time.perf_counter() - t0
t0 = time.perf_counter(); n = 0
for r in range(6):
    for x, y in data: step(m, opt, x, y); n += len(x)
dt = time.perf_counter() - t0
print(f"{mode}: warmup {warm:.1f}s, {n/dt:.1f} img/s (size {size})")
