"""LoRA fine-tuning through peft: adapters on the backbone's projections, merged for saving.

Only the adapters train; a checkpoint's inference weights are the backbone with every adapter
added in, under the plain model's parameter names, so it loads like any other checkpoint
(AutoModel, sentence-transformers) without peft. The training state keeps the adapters apart.
"""
import torch

from errors import UserError


def add_lora(backbone, lora):
    """The backbone wrapped with LoRA adapters: `lora` holds r, alpha, dropout, target_modules (None:
    every linear layer the hidden states pass through, found in the model: Qwen's and Llama's
    q_proj ... down_proj, Phi-3's qkv_proj and gate_up_proj, BERT's query, key, value and dense)."""
    from peft import LoraConfig, get_peft_model

    targets = lora["target_modules"] or linear_layers(backbone)
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=targets,
                        bias="none")
    try:
        return get_peft_model(backbone, config)
    except ValueError as err:  # peft names the target modules it could not find
        names = sorted({name.rsplit(".", 1)[-1] for name in linear_layers(backbone)})
        raise UserError(f"lora: {str(err).splitlines()[0]}; set lora.target_modules to module names of the "
                        f"backbone (this one's linear layers: {', '.join(names)}), or leave it out for all of them")


def linear_layers(backbone):
    """The full names of the backbone's linear layers, but those of modules its hidden states do not
    pass through (model.UNUSED_MODULES: BERT's pooler), which would get no gradient."""
    from model import UNUSED_MODULES

    return [name for name, module in backbone.named_modules()
            if isinstance(module, torch.nn.Linear) and name.split(".")[0] not in UNUSED_MODULES]


def is_lora(backbone):
    return hasattr(backbone, "peft_config")


@torch.no_grad()
def merged_state_dict(backbone):
    """The base model's state dict with each adapter's delta (scale x B A) added to its weight, in
    float32 before rounding back to the weight's dtype, and no adapter tensors."""
    from peft.tuners.lora import LoraLayer

    base = backbone.get_base_model()
    deltas = {f"{name}.base_layer.weight": module.get_delta_weight(adapter)
              for name, module in base.named_modules() if isinstance(module, LoraLayer)
              for adapter in module.active_adapters}
    state = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        if key in deltas:
            value = (value.float() + deltas[key].float()).to(value.dtype)
        state[key.replace(".base_layer.", ".")] = value
    return state
