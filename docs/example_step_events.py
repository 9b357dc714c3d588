import torch
import torch.nn.functional as F

from callbacks import OneCycle
from engine import StepEvents, create_trainer
from recipes.data import TensorBatches, digits_tensors
from recipes.models import small_cnn

torch.manual_seed(0)
x, y = digits_tensors()  # scikit-learn's digits, upsampled to 32x32
data = TensorBatches(x, y, batch_size=64, seed=0)
model = small_cnn(in_channels=1, num_classes=10)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)

trainer = create_trainer(model, optimizer, F.cross_entropy, precision="fp32", seed=0)
OneCycle(optimizer, max_lr=1e-2, total_steps=OneCycle.total_steps_for(2, len(data))).attach(trainer)

grad_norms = []

@trainer.on(StepEvents.BEFORE_OPTIMIZER_STEP)
def record_grad_norm(engine):
    # gradients here are true-scale under every precision (fp16 is unscaled before this event)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    grad_norms.append(torch.nn.utils.get_total_norm(grads).item())

state = trainer.run(data, max_epochs=2)
print(f"{state.optimizer_step} optimizer steps, train_loss {state.metrics['train_loss']:.3f}, "
      f"grad norm first {grad_norms[0]:.2f} last {grad_norms[-1]:.2f}")
