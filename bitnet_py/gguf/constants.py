"""GGUF constants: the single source of truth for type ids, block sizes and metadata keys.

Type ids follow ggml.h of bitnet.cpp's llama.cpp fork (I2_S = 36, TL1 = 38, TL2 = 39) and upstream
ggml (TQ1_0 = 34, TQ2_0 = 35).
"""
from __future__ import annotations

from enum import IntEnum

GGUF_MAGIC = b"GGUF"
GGUF_SUPPORTED_VERSIONS = (2, 3)
GGUF_DEFAULT_ALIGNMENT = 32


class GGMLType(IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    I2_S = 36
    I8_S = 37
    TL1 = 38
    TL2 = 39


# (elements per block, bytes per block) for the block-quantized types whose size is regular.
# I2_S and TL2 are irregular (a per-tensor tail) and sized by functions in tensor_size().
GGML_BLOCK_SIZES: dict[int, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.BF16: (1, 2),
    GGMLType.F64: (1, 8),
    GGMLType.I8: (1, 1),
    GGMLType.I16: (1, 2),
    GGMLType.I32: (1, 4),
    GGMLType.I64: (1, 8),
    GGMLType.Q4_0: (32, 2 + 16),
    GGMLType.Q4_1: (32, 2 + 2 + 16),
    GGMLType.Q5_0: (32, 2 + 4 + 16),
    GGMLType.Q5_1: (32, 2 + 2 + 4 + 16),
    GGMLType.Q8_0: (32, 2 + 32),
    GGMLType.Q8_1: (32, 4 + 4 + 32),
    GGMLType.Q2_K: (256, 2 + 2 + 256 // 16 + 256 // 4),
    GGMLType.Q3_K: (256, 2 + 256 // 4 + 256 // 8 + 12),
    GGMLType.Q4_K: (256, 2 + 2 + 256 // 2 + 12),
    GGMLType.Q5_K: (256, 2 + 2 + 256 // 2 + 256 // 8 + 12),
    GGMLType.Q6_K: (256, 2 + 256 // 2 + 256 // 4 + 256 // 16),
    GGMLType.Q8_K: (256, 4 + 256 + 256 // 16 * 2),
    GGMLType.TQ1_0: (256, 2 + 4 * 13),
    GGMLType.TQ2_0: (256, 2 + 64),
}

# Ternary weight types: matmuls over them quantize activations to int8.
TERNARY_TYPES = frozenset({GGMLType.I2_S, GGMLType.TL2, GGMLType.TQ1_0, GGMLType.TQ2_0})
# Ternary types read once at load and repacked into I2_S copies (bitnet_py.weights, the repack cache).
REPACKED_TYPES = frozenset({GGMLType.TL2, GGMLType.TQ1_0, GGMLType.TQ2_0})
# Types the engine can turn into float weights (embeddings, output heads, norms).
FLOAT_TYPES = frozenset({GGMLType.F32, GGMLType.F16, GGMLType.BF16})
# Upstream quant types we dequantize with the gguf package (embeddings / heads of some conversions).
DEQUANT_TYPES = frozenset({
    GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0,
    GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K,
})

# I2_S: 4 two-bit codes per byte in blocks of 128 values; per-tensor f32 scale in a 32-byte tail.
I2S_BLOCK = 128
TQ_BLOCK = 256  # values per TQ1_0 / TQ2_0 block (one f16 scale each)
I2S_TAIL_BYTES = 32
# TL2: three-weight groups in blocks of BK columns, two-weight groups for the rest; 32-byte scale tail.
TL2_TAIL_BYTES = 32
TL2_BMM = 32
TL2_ROWPERM = (0, 2, 1, 3)
# LLAMA_FTYPE ids written to general.file_type
FTYPE_ALL_F32 = 0
FTYPE_MOSTLY_F16 = 1
FTYPE_MOSTLY_TQ1_0 = 36
FTYPE_MOSTLY_TQ2_0 = 37
FTYPE_MOSTLY_TL2 = 39
FTYPE_MOSTLY_I2_S = 40


class GGUFValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# numpy dtype strings (little-endian) of the scalar value types
GGUF_SCALAR_DTYPES: dict[int, str] = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "<u1",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}


class Keys:
    """Metadata keys. `{arch}` is replaced by general.architecture."""

    ARCHITECTURE = "general.architecture"
    NAME = "general.name"
    ALIGNMENT = "general.alignment"
    FILE_TYPE = "general.file_type"
    QUANT_VERSION = "general.quantization_version"

    BLOCK_COUNT = "{arch}.block_count"
    CONTEXT_LENGTH = "{arch}.context_length"
    EMBEDDING_LENGTH = "{arch}.embedding_length"
    FEED_FORWARD_LENGTH = "{arch}.feed_forward_length"
    HEAD_COUNT = "{arch}.attention.head_count"
    HEAD_COUNT_KV = "{arch}.attention.head_count_kv"
    RMS_EPS = "{arch}.attention.layer_norm_rms_epsilon"
    KEY_LENGTH = "{arch}.attention.key_length"
    VALUE_LENGTH = "{arch}.attention.value_length"
    ROPE_FREQ_BASE = "{arch}.rope.freq_base"
    ROPE_DIMENSION_COUNT = "{arch}.rope.dimension_count"
    ROPE_SCALING_TYPE = "{arch}.rope.scaling.type"
    ROPE_SCALING_FACTOR = "{arch}.rope.scaling.factor"
    VOCAB_SIZE = "{arch}.vocab_size"

    TOKENIZER_MODEL = "tokenizer.ggml.model"
    TOKENIZER_PRE = "tokenizer.ggml.pre"
    TOKENS = "tokenizer.ggml.tokens"
    SCORES = "tokenizer.ggml.scores"
    TOKEN_TYPE = "tokenizer.ggml.token_type"
    MERGES = "tokenizer.ggml.merges"
    BOS_ID = "tokenizer.ggml.bos_token_id"
    EOS_ID = "tokenizer.ggml.eos_token_id"
    EOT_ID = "tokenizer.ggml.eot_token_id"
    EOM_ID = "tokenizer.ggml.eom_token_id"
    UNK_ID = "tokenizer.ggml.unknown_token_id"
    PAD_ID = "tokenizer.ggml.padding_token_id"
    ADD_BOS = "tokenizer.ggml.add_bos_token"
    ADD_EOS = "tokenizer.ggml.add_eos_token"
    ADD_SPACE_PREFIX = "tokenizer.ggml.add_space_prefix"
    CHAT_TEMPLATE = "tokenizer.chat_template"

    # bitnet-py's own: TL2 tiling recorded by our converter ([m, k, bm, bk] rows, flattened)
    TL2_TILING = "bitnet_py.tl2.tiling"


# Token types in tokenizer.ggml.token_type
class TokenType(IntEnum):
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6
