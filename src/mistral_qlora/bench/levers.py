"""The fast path's levers that `bench --compare` can switch off, and what the model does without
each: the `LayerPlan` fields (plan/layers.py) that switch it off."""

LEVERS = {
    "kept-weights": ("no fused layer keeps its dequantized weight: each dequantizes in forward and again "
                     "in backward", {"keep_weights": False}),
    "cached-weights": ("the layers that keep their weights for the run keep them from forward to backward "
                       "only, dequantizing in every forward", {"keep_across_steps": False}),
    "shared-input-grad": ("autograd adds up the input gradients of q/k/v and of gate/up",
                          {"shared_input_grad": False}),
    "product-first": ("each base GEMM writes its output and the LoRA product kernel reads it back to add "
                      "its share", {"product_first": False}),
}
