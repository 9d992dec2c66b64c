"""fused-mixed: TF32 tensor-core GEMMs (fp32 accumulation) for the float32 embedding and
fitting matmuls, set before upstream builds anything (Inductor reads the same flags)."""
import torch

torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
torch.set_float32_matmul_precision("high")
