"""Writes tests/data/before_layout_*.sgfx with the code before the layout change (issue 20)."""
import sys, torch, warnings
sys.path.insert(0, "tests")
import sgfx
from models import TinyTransformer, ConvBnNet
warnings.simplefilter("ignore")
torch.manual_seed(0)
tr = TinyTransformer(vocab=20, dim=16, heads=2, layers=1).eval()
tokens = torch.randint(0, 20, (8, 6), generator=torch.Generator().manual_seed(1))
gm = sgfx.sparsify(tr, tokens, "2:4")
sgfx.save(gm, "tests/data/before_layout_attention.sgfx")
cnn = ConvBnNet().eval()
x = torch.randn(8, *cnn.input_shape if hasattr(cnn, "input_shape") else (3, 16, 16), generator=torch.Generator().manual_seed(2))
gm2 = sgfx.sparsify(cnn, x, "2:4")
sgfx.save(gm2, "tests/data/before_layout_convbn.sgfx")
torch.save({"tokens": tokens, "attention": gm(tokens).detach(), "x": x, "convbn": gm2(x).detach()},
           "tests/data/before_layout_outputs.pt")
from models import TinyDetector
torch.manual_seed(0)
det = TinyDetector().eval()
g = torch.Generator().manual_seed(3)
items = [[torch.rand(3, 32, 32, generator=g) for _ in range(2)] for _ in range(4)]
pruned = sgfx.sparsify(det, items, "2:4", submodules=["backbone", "head"])
sgfx.save(pruned, "tests/data/before_layout_detector.sgfx")
state = torch.load("tests/data/before_layout_outputs.pt")
state["detector_images"] = items[0]
state["detector_backbone"] = pruned.backbone(torch.stack(items[0]))["p4"].detach()
torch.save(state, "tests/data/before_layout_outputs.pt")
