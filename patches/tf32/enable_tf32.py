"""Allow TF32 for float32 matmuls and convolutions before upstream builds anything."""
import torch

torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
torch.set_float32_matmul_precision("high")
