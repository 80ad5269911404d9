"""The insertion mechanics shared by every Otter architecture: the backbone that observes the base model, and
the causal LM with the inserted heads.

An Otter model carries two residual streams through the decoder: the original stream `h` (width `hidden_size`),
which is the base model's own computation, run unchanged, and the inserted stream `g` (width
`inserted_hidden_size`), which reads `h` but is never read by it. The backbone is the architecture's own model
class with the inserted parameters attached to its modules and hooks on the capture points of its
`OtterLayout` (see `inserted_stream.py`); the causal LM's forward is the architecture's own, and the inserted
heads read the final streams after it. The original logits are therefore the base model's by construction, in
every dtype, attention implementation and transformers version whose modules the layout names.

This file and the per-architecture files import only torch, transformers, safetensors and their siblings, so
they ship next to a checkpoint for `trust_remote_code`.
"""

import contextlib
import copy
import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers import LogitsProcessorList, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming
from transformers.modeling_outputs import (
    BaseModelOutputWithPastAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    MoeCausalLMOutputWithPast,
    MoeModelOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, can_return_tuple, logging

from .configuration_otter import OtterConfigMixin
from .expert_guidance import check_expert_weight, expert_guidance
from .initialization import initialize_inserted_parameters
from .inserted_heads import INSERTED_HEADS, FinalStreams, OtterTokenRewardHead, is_inserted_parameter
from .inserted_layer import (
    NormCapture,
    OtterInsertedAttention,
    OtterInsertedMLP,
    OtterInsertedPerLayerInput,
    OtterLinearAttentionReadout,
    RawInput,
    inserted_layer,
)
from .inserted_stream import (
    CACHE_ARGUMENT_NAMES,
    CapturePointMissed,
    InsertedStream,
    OtterLayout,
    inserted_cache_layer_indices,
    latent_key,
    raw_input_key,
)
from .persistence import (
    base_weights_fingerprint,
    replace_files,
    save_inserted_parameters,
    save_remote_code,
    weight_files_of,
)
from .quantization import check_supported_quantization, quantization_method, with_inserted_modules_skipped
from .reward_guided import reward_guided_generate
from .token_reward_guidance import token_reward_guidance
from .verification import check_finite_inserted_weights, check_generation_arguments, load_verified

logger = logging.get_logger(__name__)


def _base_can_set_experts_implementation(otter_class: type) -> bool:
    """Whether the base class of `otter_class` runs its experts with a choice of kernels (`grouped_mm`).

    transformers answers by reading the source of a class's module for `@use_experts_implementation`; an Otter
    class's module is the Otter file, while its experts are the base's modules, so the base class answers. Otherwise
    an Otter model would run its experts with the eager kernel where the base runs `grouped_mm`, which rounds
    differently.
    """
    base_class = next(cls for cls in otter_class.__mro__ if cls.__module__.startswith("transformers."))
    return base_class._can_set_experts_implementation()


class OtterModelMixin:
    """An architecture's backbone, its modules untouched, with the inserted stream computed beside its forward.

    The architecture's model class declares `otter_layout`. The inserted parameters are attached to the base
    modules they belong with, so their names follow the base's (`layers.0.inserted_attn.qkv_proj.weight`,
    `layers.0.input_layernorm.inserted_weight`, `embed_tokens.inserted_weight`), and the base parameters keep
    their own names. Hooks on the capture points feed the inserted stream while a forward runs inside
    `inserted_stream()`; outside it, and inside `otter_disabled()`, the backbone is the base model at base cost.
    """

    otter_layout: OtterLayout

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # The backbone's forward takes what the architecture's takes; it shows that signature (and docstring), which
        # transformers (`main_input_name`, `generate()`'s checks), Trainer (`remove_unused_columns`) and PEFT read.
        base_forward = _base_class_attribute(cls, "forward")

        @functools.wraps(base_forward)
        def forward(self, *args, **kwargs):
            return OtterModelMixin.forward(self, *args, **kwargs)

        cls.forward = forward

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return _base_can_set_experts_implementation(cls)

    def post_init(self):
        # The base __init__ has built its modules and ends here: attach the inserted parameters before transformers
        # initialises the weights, so that they are initialised (or loaded) with the others.
        self._attach_inserted_parameters()
        super().post_init()

    def _attach_inserted_parameters(self) -> None:
        config, layout = self.config, self.otter_layout
        self.otter_enabled = True
        self._inserted_stream: InsertedStream | None = None
        self._inserted_cache_indices = inserted_cache_layer_indices(config)
        for path in self._embedding_paths():
            embedding = self._capture_point(self, path)
            embedding.inserted_weight = nn.Parameter(torch.empty(embedding.num_embeddings, config.inserted_hidden_size))
        self._attach_inserted_norm(self._capture_point(self, layout.final_norm))
        for index, layer in enumerate(self.otter_decoder_layers()):
            self._attach_inserted_layer(layer, index)
        self._capture_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.register_capture_hooks()

    def _embedding_paths(self) -> list[str]:
        layout = self.otter_layout
        return [layout.token_embedding] + ([layout.position_embedding] if layout.position_embedding else [])

    def _attach_inserted_norm(self, norm: nn.Module, size: int | None = None) -> None:
        size = size or self.config.inserted_hidden_size
        norm.inserted_weight = nn.Parameter(torch.empty(size))
        if self.otter_layout.norm.has_bias:
            norm.inserted_bias = nn.Parameter(torch.empty(size))

    def _attach_inserted_layer(self, layer: nn.Module, index: int) -> None:
        config, layout = self.config, self.otter_layout
        layer_path = f"{layout.layers}.{index}"
        for path in layout.norm_paths(layer):
            self._attach_inserted_norm(self._capture_point(layer, path, layer_path))
        has_heads = layout.has_inserted_heads(layer)
        # A layer reusing an earlier layer's keys and values (Gemma 4) caches none of its own.
        caches_keys = has_heads and not self._reuses_key_values(layer)
        if caches_keys != (index in self._inserted_cache_indices):
            raise ValueError(
                f"{type(self).__name__}: decoder layer {index} "
                f"{'caches' if caches_keys else 'does not cache'} keys and values of its own, but the config's "
                "`layer_types` say otherwise: the layers and the config do not belong together."
            )
        if has_heads:
            layer.inserted_attn = self._inserted_attention(layer, layer_path, index)
        else:
            # The inserted stream reads what the linear attention adds to the original stream.
            self._capture_point(layer, layout.linear_attention, layer_path)
            layer.inserted_attn = OtterLinearAttentionReadout(config.hidden_size, config.inserted_hidden_size)
        mlp = layout.mlp_readout(layer, config)
        per_layer = layout.per_layer_input_of(layer)
        if per_layer is not None:
            projection = self._capture_point(layer, per_layer.projection, layer_path)
            layer.inserted_per_layer_input = OtterInsertedPerLayerInput(
                projection.in_features, config.inserted_hidden_size, layout.norm
            )
        if layout.output_scale is not None:
            self._capture_point(layer, layout.output_scale, layer_path, buffer=True)
        has_bias = layout.copy_source(layer, "up")[1] is not None
        activation = self._capture_point(layer, mlp.activation, layer_path)
        layer.inserted_mlp = OtterInsertedMLP(
            config.hidden_size,
            config.inserted_hidden_size,
            original_units=mlp.units_width,
            inserted_units=config.inserted_intermediate_size,
            bias=has_bias,
            act_fn=None if mlp.gated_units else activation,
            norm=layout.norm,
            gated=layout.gated_mlp,
            gated_units=mlp.gated_units(activation) if mlp.gated_units else None,
        )

    def _reuses_key_values(self, layer: nn.Module) -> bool:
        """Whether `layer`'s attention reuses an earlier layer's keys and values (Gemma 4's KV sharing)."""
        layout = self.otter_layout
        return bool(getattr(layout.key_value_sharing(layer.get_submodule(layout.attention)), "reuses", False))

    def _inserted_attention(self, layer: nn.Module, layer_path: str, index: int) -> OtterInsertedAttention:
        """The inserted heads of a layer with softmax attention."""
        config, layout = self.config, self.otter_layout
        head_dim, value_head_dim = layout.inserted_head_dims(config, index)
        # Latent attention's inserted heads read the latents beside `h_n`, each as wide as its norm.
        latent_size = sum(
            self._capture_point(layer, path, layer_path).weight.shape[0] for path in layout.attention_latents(layer)
        )
        if layout.query_key_projection_norms is not None:
            # The inserted heads' own weights over their width, on the norms whose statistics they read.
            inserted_heads = (config.inserted_num_attention_heads, config.inserted_num_key_value_heads)
            for path, heads in zip(layout.query_key_projection_norms, inserted_heads):
                norm = self._capture_point(layer, f"{layout.attention}.{path}", layer_path)
                self._attach_inserted_norm(norm, heads * head_dim)
        # The inserted projections take biases where their base counterparts have them.
        has_bias = {role: layout.copy_source(layer, role)[1] is not None for role in ("query", "output")}
        inserted_attn = OtterInsertedAttention(
            config.hidden_size,
            config.inserted_hidden_size,
            num_original_heads=config.num_attention_heads,
            num_heads=config.inserted_num_attention_heads,
            num_key_value_heads=config.inserted_num_key_value_heads,
            head_dim=head_dim,
            qkv_bias=has_bias["query"],
            output_bias=has_bias["output"],
            norm=layout.norm,
            output_gate=layout.attention_output_gate,
            value_head_dim=value_head_dim,
            latent_size=latent_size,
            rotary=layout.rotation(config),
            norms_after_rotation=layout.query_key_norms_after_rotation,
            projects_key_value=not self._reuses_key_values(layer),
        )
        # The attention functions of transformers read these from the module they are handed.
        inserted_attn.is_causal = True
        if layout.attention_sinks is not None:
            self._capture_point(layer, f"{layout.attention}.{layout.attention_sinks}", layer_path, parameter=True)
            sinks = nn.Parameter(torch.empty(config.inserted_num_attention_heads))
            setattr(inserted_attn, layout.attention_sinks, sinks)
        return inserted_attn

    def register_capture_hooks(self) -> None:
        """Hook the capture points of the layout, replacing the hooks registered before.

        Run again after base modules were replaced by others (a quantizer swaps `nn.Linear` for its own layers when
        it loads a base): the hooks of the replaced modules went with them.
        """
        layout = self.otter_layout
        for handle in self._capture_hooks:
            handle.remove()
        hooks = self._capture_hooks = []

        def hook(parent: nn.Module, path: str, parent_path: str, function: Callable, *, pre: bool, **options):
            module = self._capture_point(parent, path, parent_path)
            register = module.register_forward_pre_hook if pre else module.register_forward_hook
            hooks.append(register(function, **options))

        for path in self._embedding_paths():
            embed = functools.partial(self._embed_inserted, path == layout.token_embedding)
            hook(self, path, "", embed, pre=False)
        hook(self, layout.final_norm, "", self._normalize_final_streams, pre=False)
        for index, layer in enumerate(self.otter_decoder_layers()):
            layer_path = f"{layout.layers}.{index}"
            for path in layout.norm_paths(layer):
                hook(layer, path, layer_path, functools.partial(self._capture_norm, path), pre=False)
            for path in layout.raw_input_modules(layer):
                capture = functools.partial(self._capture_raw_input, raw_input_key(path))
                hook(layer, path, layer_path, capture, pre=True, with_kwargs=True)
            if layout.has_inserted_heads(layer):
                hook(layer, layout.attention, layer_path, self._capture_attention_call, pre=True, with_kwargs=True)
                for path in layout.attention_latents(layer):
                    hook(layer, path, layer_path, functools.partial(self._capture_output, latent_key(path)), pre=False)
                for path in layout.query_key_projection_norms or ():
                    path = f"{layout.attention}.{path}"
                    hook(layer, path, layer_path, functools.partial(self._capture_norm, path), pre=False)
                capture_heads = functools.partial(self._capture_input, layout.attention_output)
                hook(layer, layout.attention_output, layer_path, capture_heads, pre=True)
            else:
                capture_linear = functools.partial(self._capture_output, layout.linear_attention)
                hook(layer, layout.linear_attention, layer_path, capture_linear, pre=False)
            mlp = layout.mlp_readout(layer, self.config)
            if mlp.reads_output:
                capture_units = functools.partial(self._capture_output, mlp.key)
            else:
                capture_units = functools.partial(self._capture_input, mlp.key)
            hook(layer, mlp.units_path, layer_path, capture_units, pre=not mlp.reads_output)
            per_layer = layout.per_layer_input_of(layer)
            if per_layer is not None:
                capture_per_layer = functools.partial(self._capture_input, per_layer.projection)
                hook(layer, per_layer.projection, layer_path, capture_per_layer, pre=True)
            run_layer = functools.partial(self._run_inserted_layer, layer_path, index, mlp.key)
            hooks.append(layer.register_forward_hook(run_layer))

    def _capture_point(
        self, parent: nn.Module, path: str, parent_path: str = "", parameter: bool = False, buffer: bool = False
    ):
        """The module (or parameter, or buffer) at `path` in `parent`."""
        try:
            if parameter:
                return parent.get_parameter(path)
            return parent.get_buffer(path) if buffer else parent.get_submodule(path)
        except AttributeError:
            full_path = f"{parent_path}.{path}" if parent_path else path
            raise ValueError(
                f"{type(self).__name__} reads the base model at `{full_path}`, which the base model of transformers "
                f"{transformers.__version__} does not have; install a transformers version otter_hf supports (see "
                "its README)."
            ) from None

    def _set_gradient_checkpointing(self, *args, **kwargs):
        super()._set_gradient_checkpointing(*args, **kwargs)
        wrap_layer_checkpointing(self)

    def _checkpoint_with_stream(self, checkpoint: Callable, function: Callable, *args, **kwargs):
        """Checkpoint a decoder layer so that its recomputation in backward runs the capture hooks again.

        The hooks compute on the original stream (a norm's statistics) with autograd when base parameters train;
        the recomputation must save the same tensors as the first forward, after the inserted stream's context has
        closed. It runs under a replay of the stream as the layer found it, whose results are discarded.
        """
        stream = self._inserted_stream
        if stream is None:
            return checkpoint(function, *args, **kwargs)
        entering_hidden = stream.hidden

        def run_layer(*layer_args, **layer_kwargs):
            if self._inserted_stream is not None:  # the first forward, inside the stream's context
                return function(*layer_args, **layer_kwargs)
            replay = copy.copy(stream)
            replay.hidden, replay.captured, replay.hidden_states = entering_hidden, {}, None
            self._inserted_stream = replay
            try:
                return function(*layer_args, **layer_kwargs)
            finally:
                self._inserted_stream = None

        return checkpoint(run_layer, *args, **kwargs)

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """`PreTrainedModel.resize_token_embeddings`, plus the inserted embedding columns' rows (new rows as
        transformers starts the base's: their mean with `mean_resizing`, else N(0, initializer_range))."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        self._resize_inserted_embedding(embeddings.num_embeddings, mean_resizing)
        return embeddings

    def _resize_inserted_embedding(self, size: int, mean_resizing: bool) -> None:
        token_embedding = self.get_submodule(self.otter_layout.token_embedding)
        # transformers carries the base weight's `requires_grad` over to every parameter of the embedding module.
        inserted_trainable = token_embedding.inserted_weight.requires_grad
        token_embedding.inserted_weight = _resized_rows(
            token_embedding.inserted_weight, size, "mean" if mean_resizing else self.config.initializer_range
        )
        token_embedding.inserted_weight.requires_grad_(inserted_trainable)

    def _init_weights(self, module):
        super()._init_weights(module)
        sinks = self.otter_layout.attention_sinks
        if sinks is not None and isinstance(module, OtterInsertedAttention):
            init.normal_(getattr(module, sinks), mean=0.0, std=self.config.initializer_range)  # as the base's sinks
        if getattr(module, "inserted_weight", None) is None:
            return
        if isinstance(module, nn.Embedding):
            init.normal_(module.inserted_weight, mean=0.0, std=self.config.initializer_range)
        else:
            init.constant_(module.inserted_weight, self.otter_layout.norm.neutral_weight)
        if getattr(module, "inserted_bias", None) is not None:
            init.zeros_(module.inserted_bias)

    def otter_decoder_layers(self) -> list[nn.Module]:
        """The decoder layers, first to last."""
        return list(self.get_submodule(self.otter_layout.layers))

    # -- the inserted stream -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def inserted_stream(
        self, record_hidden_states: bool = False, inputs_need_grad: bool = False
    ) -> Iterator[InsertedStream | None]:
        """Compute the inserted stream beside every base forward inside the block; yields it (None inside
        `otter_disabled()`, where the backbone is the base model alone).

        While autograd records, the base runs without it and only the inserted computation builds a graph: the
        original stream depends on no inserted parameter, and the frozen base then stores no activations. It runs
        with autograd where base parameters train, or where the inputs need gradients (`inputs_need_grad`:
        trainable `inputs_embeds`, such as soft prompts).
        """
        if not self.otter_enabled:
            yield None
            return
        if self._inserted_stream is not None:
            raise RuntimeError(
                "An Otter model computes one inserted stream at a time; this forward ran inside another."
            )
        stream = InsertedStream(
            self.config,
            torch.is_grad_enabled(),
            record_hidden_states,
            norm_eps=getattr(self.config, self.otter_layout.norm_eps),
            attention_fn=ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, self.otter_layout.eager_attention_fn
            ),
            inserted_cache_indices=self._inserted_cache_indices,
        )
        base_needs_grad = stream.compute_grad and (
            inputs_need_grad
            or any(
                parameter.requires_grad
                for name, parameter in self.named_parameters()
                if not is_inserted_parameter(name)
            )
        )
        self._inserted_stream = stream
        try:
            with contextlib.nullcontext() if base_needs_grad else torch.no_grad():
                yield stream
        finally:
            self._inserted_stream = None
        num_layers = len(self.otter_decoder_layers())
        if stream.layers_run != num_layers:
            raise CapturePointMissed(f"{self.otter_layout.layers}.{stream.layers_run}")
        if stream.final_inserted is None:
            raise CapturePointMissed(self.otter_layout.final_norm)

    def _embed_inserted(self, tokens: bool, embedding: nn.Module, args: tuple, output: torch.Tensor) -> None:
        stream = self._inserted_stream
        if stream is None:
            return
        with stream.grad_mode():
            inserted = nn.functional.embedding(args[0], embedding.inserted_weight)
            scale = getattr(embedding, "embed_scale", None)  # Gemma scales its embeddings; the inserted ones alike
            if scale is not None:
                inserted = inserted * scale.to(inserted.dtype)
            inserted = self._multiply_embedding(inserted)
            stream.add_embedding(inserted)
        if tokens:
            # Inference tensors (torch.inference_mode) cannot change in place, and keep no version counter.
            stream.token_embedding = (output, None if output.is_inference() else output._version, inserted)

    def _multiply_embedding(self, inserted: torch.Tensor) -> torch.Tensor:
        multiplier = self.otter_layout.embedding_multiplier  # Granite multiplies embeddings after the module
        return inserted if multiplier is None else inserted * getattr(self.config, multiplier)

    def _enter_inputs_embeds(self, stream: InsertedStream, inputs_embeds: torch.Tensor) -> None:
        """Start the inserted stream from the `inputs_embeds` the decoder receives (see README.md, "Inputs
        embeddings").

        At a position whose embedding this forward computed from a token id with the token embedding (a
        vision-language model embeds its text, then puts image features in place of some rows), the inserted stream
        starts from that token's inserted embedding; everywhere else from the first `inserted_hidden_size`
        dimensions of the embedding, which is what the token's inserted embedding is at copy-initialisation.
        """
        with stream.grad_mode():
            inserted = self._multiply_embedding(inputs_embeds[..., : self.config.inserted_hidden_size])
            if stream.token_embedding is not None and stream.token_embedding[0].shape == inputs_embeds.shape:
                embedded, version, inserted_embedded = stream.token_embedding
                if version is not None and embedded._version != version:
                    raise RuntimeError(
                        "The token embeddings of this forward were changed in place before the decoder received them, "
                        "so Otter cannot tell which rows still hold token embeddings. Build the decoder's "
                        "`inputs_embeds` out of place (`embeddings.masked_scatter(mask, features)`, as transformers' "
                        "vision-language models do)."
                    )
                from_token = (inputs_embeds == embedded).all(dim=-1, keepdim=True)
                inserted = torch.where(from_token, inserted_embedded, inserted.to(inserted_embedded.dtype))
        stream.hidden, stream.token_embedding = inserted, None

    def _capture_norm(self, path: str, norm: nn.Module, args: tuple, output: torch.Tensor) -> None:
        stream = self._inserted_stream
        if stream is not None:
            stream.captured[path] = self._norm_capture(norm, args[0], output, stream)

    def _capture_attention_call(self, attention: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._inserted_stream is not None:
            self._inserted_stream.captured[self.otter_layout.attention] = (attention, kwargs)

    def _capture_raw_input(self, key: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._inserted_stream is not None:
            self._inserted_stream.captured[key] = RawInput(args[0] if args else kwargs["hidden_states"])

    def _capture_input(self, path: str, module: nn.Module, args: tuple) -> None:
        if self._inserted_stream is not None:
            self._inserted_stream.captured[path] = args[0]

    def _capture_output(self, path: str, module: nn.Module, args: tuple, output) -> None:
        if self._inserted_stream is not None:
            # A block returning a tuple (some sparse blocks add their router logits) has its output first, and
            # one flattening its tokens (Llama 4's) has it in the shape of its input (a module called with keyword
            # arguments alone, as Qwen3.5's linear attention, does not flatten).
            output = output[0] if isinstance(output, tuple) else output
            if args and output.dim() != args[0].dim():
                output = output.view(*args[0].shape[:-1], output.shape[-1])
            self._inserted_stream.captured[path] = output

    def _run_inserted_layer(
        self, layer_path: str, index: int, units_path: str, layer: nn.Module, args: tuple, output
    ) -> None:
        stream = self._inserted_stream
        if stream is None:
            return
        if stream.hidden is None:
            raise CapturePointMissed(self.otter_layout.token_embedding)
        if stream.hidden_states is not None:
            stream.hidden_states.append(stream.hidden)
        capture = stream.layer_capture(self.otter_layout, layer, layer_path, index, units_path)
        # A base split over several devices (`device_map`) hands each layer the original stream on its own device;
        # the inserted stream follows it there (the original units: every layer has them, not every layer heads).
        device = capture.original_units.device
        if stream.hidden.device != device:
            stream.hidden = stream.hidden.to(device)
        positions = capture.original_units.shape[-2]
        if stream.hidden.shape[-2] > positions:
            # The base dropped all but its last positions before this layer (Gemma 4 keeps only those whose logits
            # are kept before its KV-sharing layers, which need no keys of their own); the inserted stream too.
            stream.hidden = stream.hidden[..., -positions:, :]
        with stream.grad_mode():
            stream.hidden = inserted_layer(
                layer.inserted_attn,
                layer.inserted_mlp,
                stream.hidden,
                capture,
                getattr(layer, "inserted_per_layer_input", None),
            )
        stream.captured.clear()
        stream.layers_run += 1

    def _norm_capture(self, norm: nn.Module, original: torch.Tensor, normed, stream: InsertedStream) -> NormCapture:
        """A base norm seen from the inserted stream: the statistics of its input, its output, the inserted weights."""
        return NormCapture(
            statistics=self.otter_layout.norm.statistics(original, stream.norm_eps(original.device)),
            normed=normed,
            weight=norm.inserted_weight,
            bias=getattr(norm, "inserted_bias", None),
        )

    def _normalize_final_streams(self, norm: nn.Module, args: tuple, output: torch.Tensor) -> None:
        stream = self._inserted_stream
        if stream is None:
            return
        capture = self._norm_capture(norm, args[0], output, stream)
        with stream.grad_mode():
            stream.final_inserted = self.otter_layout.norm.normalize(capture, stream.hidden.to(output.device))
        stream.final_original = output
        if stream.hidden_states is not None:
            stream.hidden_states.append(stream.final_inserted)

    @can_return_tuple
    def forward(self, *args, **kwargs):
        """The architecture's own forward; run on its own, the backbone adds the inserted stream to its output
        (after the base's fields, so a tuple output keeps the base's positions)."""
        inputs_embeds = kwargs.get("inputs_embeds")
        if self._inserted_stream is not None:
            if inputs_embeds is not None:
                self._enter_inputs_embeds(self._inserted_stream, inputs_embeds)
            return super().forward(*args, **kwargs)
        if not self.otter_enabled:
            return super().forward(*args, **kwargs)
        record = bool(kwargs.get("output_hidden_states", self.config.output_hidden_states))
        inputs_need_grad = inputs_embeds is not None and inputs_embeds.requires_grad
        with self.inserted_stream(record_hidden_states=record, inputs_need_grad=inputs_need_grad) as stream:
            if inputs_embeds is not None:
                self._enter_inputs_embeds(stream, inputs_embeds)
            outputs = super().forward(*args, return_dict=True, **kwargs)
        output_class = (
            # The field, not the class: some families return router logits in an output class of their own.
            OtterMoeModelOutputWithPast if hasattr(outputs, "router_logits") else OtterModelOutputWithPast
        )
        outputs.last_hidden_state = refusing_gradient(self, outputs.last_hidden_state)
        return output_class(
            **outputs,
            inserted_last_hidden_state=stream.final_inserted,
            inserted_hidden_states=tuple(stream.hidden_states) if record else None,
        )


@dataclass
class OtterModelOutputWithPast(BaseModelOutputWithPastAndCrossAttentions):
    r"""
    The architecture's backbone output, plus the inserted stream.

    inserted_last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, inserted_hidden_size)`):
        The inserted stream after the final norm.
    inserted_hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        The inserted stream at the points where `hidden_states` records the original one.
    """

    inserted_last_hidden_state: torch.FloatTensor | None = None
    inserted_hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class OtterCausalLMOutputWithValue(CausalLMOutputWithCrossAttentions):
    r"""
    The architecture's causal LM output (`loss`, `logits`, the cache, `hidden_states`, `attentions`, and GPT-2's
    `cross_attentions`: the base model's own, bit-identical, in its order), then the inserted stream and the output
    of each inserted head.

    inserted_hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        The inserted stream at the points where `hidden_states` records the original one.
    value (`torch.FloatTensor` of shape `(batch_size, sequence_length)`):
        The value head's float32 prediction at every position (`v_head`), whatever `logits_to_keep`.
    draft_logits (`torch.FloatTensor` of shape `(batch_size, kept_positions, num_draft_heads, vocab_size)`,
        *optional*):
        With `output_draft_logits=True`: draft head k's logits for the token k + 2 positions on (`draft_heads`).
    recurrent_draft_logits (`torch.FloatTensor` of shape `(batch_size, sequence_length - 1, draft_vocab_size)`,
        *optional*):
        With `output_recurrent_draft_logits=True`: the recurrent draft head's teacher-forced first step, over its
        draft vocabulary (`recurrent_draft_head`).
    token_reward_logits (`torch.FloatTensor` of shape `(batch_size, kept_positions, vocab_size)`, *optional*):
        With `output_token_reward_logits=True`: the token-level reward head's logits (`token_reward_head`).
    expert_logits (`torch.FloatTensor` of shape `(batch_size, kept_positions, vocab_size)`, *optional*):
        With `output_expert_logits=True`: the expert head's language-model logits (`expert_head`).
    anti_expert_logits (`torch.FloatTensor` of shape `(batch_size, kept_positions, vocab_size)`, *optional*):
        With `output_anti_expert_logits=True`: the anti-expert head's language-model logits (`anti_expert_head`).
    """

    inserted_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    value: torch.FloatTensor | None = None
    draft_logits: torch.FloatTensor | None = None
    recurrent_draft_logits: torch.FloatTensor | None = None
    token_reward_logits: torch.FloatTensor | None = None
    expert_logits: torch.FloatTensor | None = None
    anti_expert_logits: torch.FloatTensor | None = None


def _base_class_attribute(cls: type, name: str):
    """`name` as the architecture's own class (the first transformers class in `cls`'s MRO) defines it."""
    return next(getattr(base, name) for base in cls.__mro__ if base.__module__.startswith("transformers."))


def wrap_layer_checkpointing(model: nn.Module) -> None:
    """Have each Otter backbone in `model` checkpoint its decoder layers through `_checkpoint_with_stream`, after
    transformers handed them their checkpointing function."""
    for backbone in model.modules():
        if not isinstance(backbone, OtterModelMixin):
            continue
        for layer in backbone.otter_decoder_layers():
            checkpoint = getattr(layer, "_gradient_checkpointing_func", None)
            if checkpoint is None or getattr(checkpoint, "func", None) == backbone._checkpoint_with_stream:
                continue
            if isinstance(checkpoint, functools.partial) and checkpoint.keywords.get("use_reentrant"):
                # A reentrant checkpoint runs the layer without autograd and passes gradients through its outputs
                # only: what the capture hooks hand the inserted stream would carry none to the base parameters.
                logger.warning_once(
                    "Otter checkpoints its decoder layers with use_reentrant=False: the inserted stream reads the "
                    "layers' insides, whose gradients a reentrant checkpoint would drop."
                )
                checkpoint = functools.partial(
                    checkpoint.func, *checkpoint.args, **{**checkpoint.keywords, "use_reentrant": False}
                )
            layer._gradient_checkpointing_func = functools.partial(backbone._checkpoint_with_stream, checkpoint)


def _inserted_parameters_held(otter_class: type, path, kwargs: dict) -> tuple[str, dict]:
    """Which inserted parameters the checkpoint at `path` holds, by its config: `"all"` (an Otter checkpoint),
    `"backbone"` (a save of the Otter backbone alone, without the inserted heads) or `"none"` (a checkpoint of the
    base architecture); and the saved config."""
    if path is None:
        return "all", {}
    hub_options = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
    saved, _ = PreTrainedConfig.get_config_dict(path, **{key: kwargs[key] for key in hub_options if key in kwargs})
    if saved.get("model_type") != otter_class.config_class.model_type:
        return "none", saved
    return "backbone" if saved.get("architectures") == [otter_class.backbone_class.__name__] else "all", saved


# Fields of a saved config that describe the checkpoint rather than the model.
_CHECKPOINT_BOOKKEEPING = ("model_type", "architectures", "auto_map", "transformers_version")


@dataclass
class OtterMoeModelOutputWithPast(OtterModelOutputWithPast, MoeModelOutputWithPast):
    r"""
    A mixture-of-experts backbone's output: the base's fields (its `router_logits` with `output_router_logits=True`)
    in the base's order, then the inserted stream.
    """


@dataclass
class OtterMoeCausalLMOutputWithValue(OtterCausalLMOutputWithValue, MoeCausalLMOutputWithPast):
    r"""
    A mixture-of-experts causal LM's output: the base's fields in the base's order (with `output_router_logits=True`
    its `aux_loss`, included in `loss` with labels, and its `router_logits`), then those of
    `OtterCausalLMOutputWithValue`.
    """


def _causal_lm_output_class(outputs: ModelOutput) -> type:
    """The Otter output for the base causal LM's output: with the router outputs of a mixture of experts, or the
    base's other fields (a vision-language model's image features) before the Otter ones."""
    # The field, not the class: some families (Gemma 4) return router logits in an output class of their own.
    if hasattr(outputs, "router_logits"):
        return OtterMoeCausalLMOutputWithValue
    if {field.name for field in dataclasses.fields(outputs)} <= _CAUSAL_LM_FIELDS:
        return OtterCausalLMOutputWithValue
    return _otter_output_class(type(outputs))


_CAUSAL_LM_FIELDS = frozenset(field.name for field in dataclasses.fields(CausalLMOutputWithCrossAttentions))


@functools.cache
def _otter_output_class(base_output_class: type) -> type:
    """`base_output_class` with the fields `OtterCausalLMOutputWithValue` adds, after the base's."""
    otter_fields = [
        (field.name, field.type, dataclasses.field(default=None))
        for field in dataclasses.fields(OtterCausalLMOutputWithValue)
        if field.name not in _CAUSAL_LM_FIELDS
    ]
    return dataclasses.make_dataclass(
        f"Otter{base_output_class.__name__}WithValue", otter_fields, bases=(base_output_class,)
    )


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    # The base model as loaded has trainable weights, and for a strided 3D input (the last position of a batch,
    # `logits_to_keep=1`) torch folds the matmul into 2D only when the weight requires grad; the frozen LM head
    # would take a batched matmul that rounds differently. The same values, laid out as the base's fold lays them.
    return (args[0].contiguous(), *args[1:])


FROZEN_OUTPUT_LOSS_REFUSED = (
    "This loss reaches only the base model's output (the original logits or hidden states), which no trainable "
    "parameter of this Otter model changes: its base is frozen and the inserted parameters never touch it. TRL's "
    "SFTTrainer and other language-modelling losses fine-tune the base: run them on the base model, or make base "
    "parameters trainable with a PEFT adapter (`exclude_modules=otter_hf.PEFT_EXCLUDE_MODULES`). To train the "
    "inserted parameters use otter_hf's trainers: `OtterExpertTrainer` for SFT data (the language-modelling loss on "
    "the expert heads), `OtterRewardTrainer` for preference pairs, `OtterValueTrainer`, `OtterTokenRewardTrainer`, "
    "`OtterDraftTrainer`."
)


class _RefuseFrozenOutputGradient(torch.autograd.Function):
    """The identity on an output of the frozen base, whose backward raises `FROZEN_OUTPUT_LOSS_REFUSED`.

    Without it, a loss built on the base's output alone (TRL's `SFTTrainer` computes its loss from the backbone's
    hidden states and the LM head) fails in `backward()` with torch's "element 0 of tensors does not require grad",
    which says nothing about the cause. It hangs off an inserted parameter, so such a loss requires grad and reaches
    it; losses on the inserted heads' outputs never do."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        # A copy: torch forbids editing in place a view made inside a custom Function, and code edits logits in
        # place (masking a token's score). Only forwards with gradients on pay for it; generate() runs without.
        return output.clone()

    @staticmethod
    def backward(ctx, *grad_outputs):
        raise ValueError(FROZEN_OUTPUT_LOSS_REFUSED)


def refusing_gradient(model: nn.Module, output: torch.Tensor) -> torch.Tensor:
    """`output` of the base computation, unchanged, which raises a clear error if a loss on it is differentiated
    while the base is frozen (see `_RefuseFrozenOutputGradient`)."""
    if not torch.is_grad_enabled() or output.requires_grad:
        return output
    anchor = next((p for name, p in model.named_parameters() if is_inserted_parameter(name) and p.requires_grad), None)
    return output if anchor is None else _RefuseFrozenOutputGradient.apply(output, anchor)


def _refuse_assisted_decoding(generate_kwargs: dict, weight_name: str) -> None:
    # Assisted and prompt-lookup decoding verify several drafted tokens per forward, where guidance rescores every
    # step's candidates: combined, guidance would be skipped for the accepted drafts.
    if generate_kwargs.get("assistant_model") is not None or generate_kwargs.get("prompt_lookup_num_tokens"):
        raise ValueError(
            f"`{weight_name}` guides every step from the model's own forward; assisted decoding (`assistant_model`, "
            "`prompt_lookup_num_tokens`) accepts drafted tokens without that step, so the two do not combine. Drop "
            "one of them (otter_hf's own speculative decoding drafts with the model's draft heads: "
            "`otter_hf.generation`)."
        )


@torch.no_grad()
def _resized_rows(weight: nn.Parameter, rows: int, new_rows: str | float) -> nn.Parameter:
    """`weight` with `rows` rows: its own first, then new ones (`"mean"` of the old rows, `"zeros"`, or normal with
    that standard deviation)."""
    kept = min(rows, weight.shape[0])
    resized = weight.new_empty(rows, *weight.shape[1:])
    resized[:kept] = weight[:kept]
    if rows > kept:
        if new_rows == "mean":
            resized[kept:] = weight.float().mean(0).to(weight.dtype)
        elif new_rows == "zeros":
            resized[kept:] = 0
        else:
            resized[kept:].normal_(0.0, new_rows)
    return nn.Parameter(resized, requires_grad=weight.requires_grad)


class OtterForCausalLMMixin:
    """The Otter causal LM with value head: the architecture's causal LM on the Otter backbone, plus the inserted
    heads of `INSERTED_HEADS` (`v_head`, and those its config asks for)."""

    backbone_class: type
    _keep_in_fp32_modules_strict = [head.attribute for head in INSERTED_HEADS if head.keep_in_fp32]
    # Auto class name -> the Otter class it loads, filled in by `otter_hf.modeling`: a saved checkpoint ships
    # their code and maps them in `auto_map`, so it loads through each of these Auto classes with
    # trust_remote_code where otter_hf is not installed.
    auto_map_classes: dict[str, type] = {}
    # `otter_hf.lifecycle.hub.push_to_hub`, registered by that module where otter_hf is installed.
    push_with_model_card: Callable | None = None

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return _base_can_set_experts_implementation(cls)

    def __init__(self, config):
        PreTrainedModel.__init__(self, config)
        setattr(self, self.base_model_prefix, self.backbone_class(config))
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.register_forward_pre_hook(_contiguous_input)
        for head in INSERTED_HEADS:
            setattr(self, head.attribute, head.module_class(config) if head.is_built(config) else None)
        self.post_init()
        self.freeze_base_parameters()

    @functools.cached_property
    def _cache_argument(self) -> str:
        """The base causal LM's name for its cache argument."""
        parameters = inspect.signature(_base_class_attribute(type(self), "forward")).parameters
        return next(name for name in CACHE_ARGUMENT_NAMES if name in parameters)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, verified (`load_verified`).

        From a checkpoint of the base architecture (`LlamaForCausalLM`'s for `OtterLlamaForCausalLMWithValueHead`)
        it gives what `otter_hf.insert` gives: the insertion options come as keyword arguments (`inserted_init`,
        `inserted_hidden_size`, ...) or in `config`, and the inserted parameters, initialised as `insert` does,
        are reported as missing (newly initialised). A checkpoint of the Otter backbone alone gets the inserted
        heads likewise. An Otter checkpoint that lacks inserted weights its architecture holds is refused.
        """
        holds, saved = _inserted_parameters_held(cls, pretrained_model_name_or_path, kwargs)
        if holds == "none" and "config" not in kwargs:
            # Built here rather than by transformers, which would set the options after the sizes derived from
            # them (`inserted_intermediate_size` from `inserted_hidden_size`).
            option_names = {field.name for field in dataclasses.fields(OtterConfigMixin)}
            options = {name: kwargs.pop(name) for name in list(kwargs) if name in option_names}
            base_settings = {key: value for key, value in saved.items() if key not in _CHECKPOINT_BOOKKEEPING}
            kwargs["config"] = cls.config_class(**{**base_settings, **options})
        check_supported_quantization(saved.get("quantization_config"))
        if kwargs.get("quantization_config") is not None:
            # Quantizing the base only: otter_hf, not the user, keeps the inserted modules out of the quantizer's reach.
            config = kwargs.get("config")
            if not isinstance(config, PreTrainedConfig):
                config = cls.config_class.from_dict(
                    {k: v for k, v in saved.items() if k not in _CHECKPOINT_BOOKKEEPING}
                )
            with torch.device("meta"):
                skeleton = cls(config)
            kwargs["quantization_config"] = with_inserted_modules_skipped(kwargs["quantization_config"], skeleton)
        heads = tuple(f"{head.attribute}." for head in INSERTED_HEADS)

        def newly_inserted(name: str) -> bool:
            return holds == "none" or (holds == "backbone" and name.startswith(heads))

        wants_loading_info = kwargs.pop("output_loading_info", False)
        model, loading_info = load_verified(
            cls,
            super().from_pretrained,
            pretrained_model_name_or_path,
            *args,
            newly_inserted=newly_inserted,
            output_loading_info=True,
            **kwargs,
        )
        loaded = (model, loading_info) if wants_loading_info else model
        base_missing = sorted(name for name in loading_info["missing_keys"] if not is_inserted_parameter(name))
        if holds == "none" and base_missing:
            raise ValueError(
                f"{pretrained_model_name_or_path} is a checkpoint of the base architecture, but loading it into "
                f"{cls.__name__} left base weights unloaded ({', '.join(base_missing[:4])}, ...): its layout does not "
                "map onto the Otter class here. Load the base and insert into it instead: "
                "`otter_hf.insert(AutoModelForCausalLM.from_pretrained(path))`."
            )
        if holds == "none":
            initialize_inserted_parameters(model, model.config.inserted_init)
            model.config.base_model_name_or_path = str(pretrained_model_name_or_path)
            model.config.base_model_fingerprint = model.base_weights_fingerprint()
        elif holds == "backbone":
            for head in INSERTED_HEADS:
                if getattr(model, head.attribute) is not None:
                    getattr(model, head.attribute).initialize(model.config.inserted_init, model.config)
        # A quantizer replaces base modules (quanto's `QLinear` for `nn.Linear`) after the hooks were registered.
        model.otter_backbone.register_capture_hooks()
        # Loading swaps in fresh parameters, which come back trainable.
        model.freeze_base_parameters()
        return loaded

    def _set_gradient_checkpointing(self, *args, **kwargs):
        super()._set_gradient_checkpointing(*args, **kwargs)
        wrap_layer_checkpointing(self)

    # -- inserted parameters -------------------------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        # What differs from `nn.Module._apply`: the heads transformers loads in float32 (`_keep_in_fp32_modules_strict`)
        # stay in float32 through `model.to(dtype)`, `.half()` and `.bfloat16()`, as they do through loading.
        super()._apply(fn, recurse)
        for head in INSERTED_HEADS:
            module = getattr(self, head.attribute, None) if head.keep_in_fp32 else None
            if module is not None and any(
                p.is_floating_point() and p.dtype != torch.float32 for p in module.parameters()
            ):
                module.float()
        return self

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """`PreTrainedModel.resize_token_embeddings`, plus what Otter holds per vocabulary entry: the inserted
        embedding columns (new rows as transformers starts the base's: their mean with `mean_resizing`, else
        N(0, initializer_range)) and the rows of the token-level reward head and the expert heads (new rows zero:
        their policies start as the base policy for new tokens too)."""
        inserted_trainable = self.otter_backbone.get_input_embeddings().inserted_weight.requires_grad
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        size = embeddings.num_embeddings
        self.otter_backbone._resize_inserted_embedding(size, mean_resizing)
        self.otter_backbone.get_input_embeddings().inserted_weight.requires_grad_(inserted_trainable)
        # The heads with a row per vocabulary entry on the inserted stream: the token-level reward head, the experts.
        for head in INSERTED_HEADS:
            module = getattr(self, head.attribute)
            if isinstance(module, OtterTokenRewardHead):
                module.proj.weight = _resized_rows(module.proj.weight, size, "zeros")
                module.proj.out_features = size
        return embeddings

    def freeze_base_parameters(self) -> None:
        """Freeze every original parameter; only the inserted ones (inserted heads included) stay trainable."""
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(is_inserted_parameter(name))

    def _trains_base(self) -> bool:
        return any(p.requires_grad for name, p in self.named_parameters() if not is_inserted_parameter(name))

    def otter_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((name, p) for name, p in self.named_parameters() if is_inserted_parameter(name))

    def otter_state_dict(self) -> dict[str, torch.Tensor]:
        """The inserted parameters and the inserted modules' persistent buffers (a draft vocabulary's token ids):
        everything `save_otter` writes."""
        state = dict(self.otter_named_parameters())
        persistent_buffers = self.state_dict(keep_vars=True).keys()
        state.update(
            (name, buffer)
            for name, buffer in self.named_buffers()
            if is_inserted_parameter(name) and name in persistent_buffers
        )
        return state

    def otter_parameters(self) -> Iterator[nn.Parameter]:
        return (parameter for _, parameter in self.otter_named_parameters())

    def num_inserted_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.otter_parameters())

    def num_base_parameters(self) -> int:
        return sum(p.numel() for name, p in self.named_parameters() if not is_inserted_parameter(name))

    def inserted_parameter_fraction(self) -> float:
        """Inserted parameters as a fraction of the base model's parameters."""
        return self.num_inserted_parameters() / self.num_base_parameters()

    def compute_draft_logits(self, hidden: torch.Tensor, inserted_hidden: torch.Tensor) -> torch.Tensor:
        """Draft-head logits (..., num_draft_heads, vocab_size) from final (post-norm) hidden states of both streams."""
        return self.logits_from_hidden(self.draft_heads(hidden, inserted_hidden))

    def token_embeddings(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """Rows of the base model's input embedding matrix (unscaled, without the inserted columns)."""
        return nn.functional.embedding(input_ids, self.get_input_embeddings().weight)

    def otter_decoder_layers(self) -> list[nn.Module]:
        """The decoder layers, first to last, each holding its `inserted_attn` and `inserted_mlp`."""
        return self.otter_backbone.otter_decoder_layers()

    def process_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What the architecture's causal LM does to the LM head's output (Gemma: final-logit softcapping), for
        hidden states the base forward never saw (draft heads)."""
        return logits

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The original logits for final (post-norm) original-stream hidden states, as the base causal LM gives them."""
        return self.process_logits(self.lm_head(hidden))

    @property
    def otter_backbone(self) -> nn.Module:
        """The Otter backbone, where the inserted stream runs: the base model (a vision-language model's language
        model)."""
        return self.base_model

    @property
    def otter_enabled(self) -> bool:
        """Whether the inserted stream runs (False inside `otter_disabled()`)."""
        return self.otter_backbone.otter_enabled

    def final_streams(self, **inputs) -> tuple[torch.Tensor, torch.Tensor | None, ModelOutput]:
        """Run the decoder alone (no LM head, no inserted heads) on `inputs` and return the final (post-norm)
        original and inserted hidden states (None inside `otter_disabled()`), and the decoder's output."""
        if "past_key_values" in inputs and self._cache_argument != "past_key_values":
            inputs[self._cache_argument] = inputs.pop("past_key_values")  # the name this transformers reads
        with self.otter_backbone.inserted_stream() as stream:
            outputs = self.otter_backbone(**inputs)
        return outputs.last_hidden_state, stream.final_inserted if stream is not None else None, outputs

    def base_weights_fingerprint(self) -> str:
        return base_weights_fingerprint(
            ((name, parameter) for name, parameter in self.named_parameters() if not is_inserted_parameter(name)), self
        )

    @contextlib.contextmanager
    def otter_disabled(self):
        """Run the base computation only, at base cost: no value, no inserted keys and values cached."""
        backbone = self.otter_backbone
        previous, backbone.otter_enabled = backbone.otter_enabled, False
        try:
            yield self
        finally:
            backbone.otter_enabled = previous

    # -- forward -------------------------------------------------------------------------------------------

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_draft_logits: bool = False,
        output_recurrent_draft_logits: bool = False,
        output_token_reward_logits: bool = False,
        output_expert_logits: bool = False,
        output_anti_expert_logits: bool = False,
        **kwargs,
    ) -> OtterCausalLMOutputWithValue:
        r"""
        The architecture's causal LM forward, unchanged, plus the outputs of the inserted heads.

        output_draft_logits (`bool`, *optional*, defaults to `False`):
            Also compute the draft heads' `draft_logits`.
        output_recurrent_draft_logits (`bool`, *optional*, defaults to `False`):
            Also compute the recurrent draft head's `recurrent_draft_logits` (needs `input_ids`).
        output_token_reward_logits (`bool`, *optional*, defaults to `False`):
            Also compute the token-level reward head's `token_reward_logits`.
        output_expert_logits (`bool`, *optional*, defaults to `False`):
            Also compute the expert head's `expert_logits`.
        output_anti_expert_logits (`bool`, *optional*, defaults to `False`):
            Also compute the anti-expert head's `anti_expert_logits`.

        The other arguments are the base causal LM's; `return_dict=False` returns the tuple of the fields that are
        set, the base's first, in the base's order. The cache goes under this transformers' name for it (`cache`
        from 5.25 on) or under `past_key_values` on every version.
        """
        if "past_key_values" in kwargs and self._cache_argument != "past_key_values":
            kwargs[self._cache_argument] = kwargs.pop("past_key_values")
        inputs_need_grad = inputs_embeds is not None and inputs_embeds.requires_grad
        if labels is not None and torch.is_grad_enabled() and not (self._trains_base() or inputs_need_grad):
            raise ValueError(
                "`labels` gives the base model's language-modelling loss, which no trainable parameter of this model "
                "reaches: the base is frozen and the inserted parameters never change the original logits. Train the "
                "inserted parameters with the Otter trainers (value, token reward, drafts), or make base parameters "
                "trainable (e.g. with a PEFT adapter) to fine-tune the base; compute the loss alone under "
                "`torch.no_grad()`."
            )
        requested = {
            "draft_logits": output_draft_logits,
            "recurrent_draft_logits": output_recurrent_draft_logits,
            "token_reward_logits": output_token_reward_logits,
            "expert_logits": output_expert_logits,
            "anti_expert_logits": output_anti_expert_logits,
        }
        record_hidden_states = bool(kwargs.get("output_hidden_states", self.config.output_hidden_states))
        with self.otter_backbone.inserted_stream(record_hidden_states, inputs_need_grad) as stream:
            outputs = super().forward(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                return_dict=True,
                **kwargs,
            )
        if stream is None:
            if any(requested.values()):
                asked = ", ".join(f"`output_{field}=True`" for field, asked in requested.items() if asked)
                raise ValueError(f"{asked} needs the inserted stream switched on (it is off in `otter_disabled()`).")
            return _causal_lm_output_class(outputs)(**outputs)

        streams = FinalStreams(
            stream.final_original,
            stream.final_inserted,
            outputs.logits,
            logits_to_keep,
            self.logits_from_hidden,
            input_ids=input_ids,
            token_embeddings=self.token_embeddings,
        )
        head_outputs = {}
        for head in INSERTED_HEADS:
            module = getattr(self, head.attribute)
            if not (head.computed_by_default or requested.get(head.output_field)):
                continue
            if module is not None:
                head_outputs[head.output_field] = module.predict(streams)
            elif not head.computed_by_default:
                raise ValueError(f"`{head.request_argument}=True` needs {head.description}.")
        # The heads have read the logits; a loss on the returned ones alone reaches no trainable parameter.
        outputs.logits = refusing_gradient(self, outputs.logits)
        return _causal_lm_output_class(outputs)(
            **outputs,
            inserted_hidden_states=tuple(stream.hidden_states) if record_hidden_states else None,
            **head_outputs,
        )

    # -- generation ----------------------------------------------------------------------------------------

    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config=None,
        logits_processor: LogitsProcessorList | None = None,
        *args,
        token_reward_weight: float | None = None,
        reward_weight: float | None = None,
        reward_top_k: int | None = None,
        expert_weight: float | None = None,
        **kwargs,
    ):
        r"""
        transformers' `generate()`, plus guidance by the in-model reward through plain arguments.

        Args:
            token_reward_weight (`float`, *optional*):
                Decode from `logits + token_reward_weight * log_softmax(token_reward_logits)`, both from the same
                forward (needs `token_reward_head=True`). Works with every decoding strategy that runs one forward
                per step: greedy, sampling with its warpers, beam search, streamers. 0 decodes exactly as the base
                model, at its cost.
            reward_weight (`float`, *optional*):
                ARGS guidance by the value head: the `reward_top_k` best tokens of each step are rescored as
                `score + reward_weight * value`, in one forward of the candidates over the shared cache
                (`reward_guided_generate`, which ships with the checkpoint's code like this file).
            reward_top_k (`int`, *optional*, defaults to 10): candidates rescored per step with `reward_weight`.
            expert_weight (`float`, *optional*):
                DExperts-style steering by the expert heads (needs `expert_heads=True`): decode from
                `logits + expert_weight * (log_softmax(expert_logits) - log_softmax(anti_expert_logits))`, all
                from the same forward. For greedy search and sampling this is DExperts' `logits + alpha *
                (expert_logits - anti_expert_logits)` exactly (the two differ by a constant per row); beam search
                adds log-probability ratios, free of the heads' logit offsets, to its beam scores (see
                `expert_guidance.py`). Negative weights steer towards the anti-expert; 0 decodes exactly as the base
                model, at its cost.

        The other arguments are `GenerationMixin.generate`'s.
        """
        check_generation_arguments(self, inputs, kwargs, reward_weight, token_reward_weight, reward_top_k)
        if expert_weight is not None:
            return self._expert_steered_generate(
                expert_weight,
                inputs,
                generation_config,
                logits_processor,
                *args,
                other_guidance=reward_weight is not None or token_reward_weight is not None or reward_top_k is not None,
                **kwargs,
            )
        if reward_weight is not None or reward_top_k is not None:
            if token_reward_weight is not None:
                raise ValueError(
                    "Pass either `token_reward_weight` (the token-level reward head) or `reward_weight` (ARGS with "
                    "the value head), not both."
                )
            if reward_weight is None:
                raise ValueError("`reward_top_k` sets ARGS guidance; pass `reward_weight=...` with it.")
            _refuse_assisted_decoding(kwargs, "reward_weight")
            if kwargs.get("custom_generate") is None:
                if reward_weight == 0:  # guidance off: the base's own decoding, whatever the strategy (beams too)
                    with self.otter_disabled():
                        return super().generate(inputs, generation_config, logits_processor, *args, **kwargs)
                kwargs["custom_generate"] = reward_guided_generate
            # Passed on as the decoding loop's own arguments (also to a `custom_generate` the caller names).
            kwargs["reward_weight"] = reward_weight
            if reward_top_k is not None:
                kwargs["reward_top_k"] = reward_top_k
            return super().generate(inputs, generation_config, logits_processor, *args, **kwargs)
        if token_reward_weight is None:
            return super().generate(inputs, generation_config, logits_processor, *args, **kwargs)

        _refuse_assisted_decoding(kwargs, "token_reward_weight")
        if self.token_reward_head is None:
            raise ValueError(
                "`token_reward_weight` needs a token-level reward head: insert with "
                "`otter_hf.insert(base, token_reward_head=True)` and train it with `OtterTokenRewardTrainer`."
            )
        if token_reward_weight == 0:
            with self.otter_disabled():
                return super().generate(inputs, generation_config, logits_processor, *args, **kwargs)
        if not self.otter_enabled:
            raise ValueError(
                "The inserted stream is switched off (`otter_disabled()`); token-reward guidance needs it on."
            )
        with token_reward_guidance(self, token_reward_weight) as guidance:
            processors = LogitsProcessorList([*(logits_processor or []), guidance])
            return super().generate(inputs, generation_config, processors, *args, **kwargs)

    def _expert_steered_generate(
        self, expert_weight, inputs, generation_config, logits_processor, *args, other_guidance: bool, **kwargs
    ):
        """`generate(expert_weight=...)`, once the other arguments have been checked."""
        check_expert_weight("expert_weight", expert_weight)
        if other_guidance:
            raise ValueError(
                "Pass one guidance at a time: `expert_weight` (the expert heads) or `token_reward_weight` / "
                "`reward_weight` (the reward heads)."
            )
        if self.expert_head is None:
            raise ValueError(
                "`expert_weight` needs expert heads: insert with `otter_hf.insert(base, expert_heads=True)` and "
                "train them with `OtterExpertTrainer`."
            )
        if expert_weight == 0:
            with self.otter_disabled():
                return super().generate(inputs, generation_config, logits_processor, *args, **kwargs)
        if not self.otter_enabled:
            raise ValueError("The inserted stream is switched off (`otter_disabled()`); expert steering needs it on.")
        with expert_guidance(self, expert_weight) as steering:
            processors = LogitsProcessorList([*(logits_processor or []), steering])
            return super().generate(inputs, generation_config, processors, *args, **kwargs)

    # -- saving --------------------------------------------------------------------------------------------

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the modeling files and `auto_map` for `trust_remote_code`.

        The files it writes replace the previous ones as a unit (an interrupted save leaves the previous
        checkpoint), its stale weight files go, and other files in the folder, such as a tokenizer, stay; see
        `otter_hf.modeling.persistence`.
        """
        check_finite_inserted_weights(self.otter_state_dict().items(), f"save {save_directory}")
        quantizer = getattr(self, "hf_quantizer", None)
        if quantizer is not None and not quantizer.is_serializable():
            method = quantization_method(quantizer.quantization_config)
            raise ValueError(
                f"The base is quantized with {method}, which transformers cannot save whole. Save the inserted "
                f"weights with `model.save_otter(directory)`: they record the base and its quantization, and "
                "`otter_hf.load_otter(base_path, directory)` loads the base quantized the same way."
            )
        if kwargs.get("push_to_hub"):
            save_remote_code(self, save_directory)
            return super().save_pretrained(save_directory, *args, **kwargs)
        with replace_files(save_directory, stale=weight_files_of(kwargs.get("variant"))) as staging:
            save_remote_code(self, staging)
            super().save_pretrained(staging, *args, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload weights, config, modeling code and an Otter model card to `repo_id` in one commit.

        See `otter_hf.push_to_hub` for the options (`otter_only`, the card's `trained_on`, `metrics`,
        `overhead`, ...). This file also runs as remote code where otter_hf is not installed; there the upload
        is transformers' own, with its generic model card.
        """
        if OtterForCausalLMMixin.push_with_model_card is None:
            return super().push_to_hub(repo_id, **kwargs)
        return OtterForCausalLMMixin.push_with_model_card(self, repo_id, **kwargs)

    def save_otter(self, save_directory) -> None:
        """Write only the inserted parameters (safetensors) and a config naming the base model and the
        fingerprint of its weights; `otter_hf.load_otter(base, save_directory)` attaches them again."""
        check_finite_inserted_weights(self.otter_state_dict().items(), f"save {save_directory}")
        self.config.base_model_fingerprint = self.base_weights_fingerprint()
        save_inserted_parameters(save_directory, self.otter_state_dict().items(), self.config)


class OtterMoeForCausalLMMixin(OtterForCausalLMMixin):
    """The Otter causal LM of a mixture-of-experts architecture. Its base causal LM's forward computes the
    auxiliary load-balancing loss from settings its `__init__` keeps, which the Otter `__init__` (building the
    Otter backbone in place of the base's) sets the same way."""

    # The config field of the number of routed experts (Granite-MoE's is `num_local_experts`).
    num_experts_field = "num_experts"

    def __init__(self, config):
        super().__init__(config)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = getattr(config, self.num_experts_field)
        self.num_experts_per_tok = config.num_experts_per_tok


def keep_base_checkpoint_format(config_class: type, renamings: bool = False) -> None:
    """Save and load an Otter architecture's original weights in its base's checkpoint layout.

    transformers converts the checkpoints of some families as it loads them (a mixture of experts' per-expert
    weights stacked into fused 3-D parameters) and back as it saves them, by `model_type`; the Otter `model_type`
    takes its base's converters. An Otter checkpoint then holds the experts per expert, as the base checkpoint
    does, and both load the same way: stacked into fresh tensors, whose memory alignment (which the rounding of
    some CPU kernels depends on) is the base's, so the original logits stay bit-identical after a reload.

    The base's renamings of legacy module names are left out unless `renamings`: a renaming's pattern can match an
    inserted module too (Mixtral's `.mlp.` matches `inserted_mlp.`). A family whose renamings name only parameters
    of its own blocks (Granite-MoE's `block_sparse_moe.input_linear.weight`) keeps them, so that its experts are
    stored under the names the base checkpoint gives them.
    """
    mapping = get_checkpoint_conversion_mapping(config_class.base_model_type) or []
    kept = (WeightConverter, WeightRenaming) if renamings else WeightConverter
    transforms = [transform for transform in mapping if isinstance(transform, kept)]
    if transforms:
        # Overwriting: the class is defined again when its file loads as a checkpoint's remote code.
        register_checkpoint_conversion_mapping(config_class.model_type, transforms, overwrite=True)
