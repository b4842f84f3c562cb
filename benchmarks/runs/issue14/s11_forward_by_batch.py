"""Images/s and CPU per image of the proxy zero-shot classifier's forward pass, by batch size (issue 14, session 11)."""
import time, torch
from coft import PROXY_MODEL, load_backbone, zero_shot_classifier
b = load_backbone(PROXY_MODEL, None, "cpu")
clf = zero_shot_classifier(b, ["circle", "square", "triangle", "star"])
x = torch.randn(64, 3, 32, 32)
print("torch threads", torch.get_num_threads())
for bs in [1, 4, 8, 16, 32, 64]:
    n, t0 = 0, time.perf_counter(); c0 = time.process_time()
    while time.perf_counter() - t0 < 3:
        clf.probabilities(x[:bs]); n += bs
    w = time.perf_counter() - t0
    print(f"batch {bs}: {n / w:.0f} images/s, {1000 * (time.process_time() - c0) / n:.2f} ms CPU per image")
