"""Every byte-layout fact of ders in one place. Depends on nothing.

docs/FORMAT.md is the specification; the numbers here are the ones it names.
"""

from __future__ import annotations

# --- the .ders archive -------------------------------------------------------------------------

FORMAT_NAME = "ders"
FORMAT_VERSION = 4  # the newest version this ders reads; it writes the oldest that suffices
# The checksums of stored arrays, tensors and synthesized members are BLAKE3 from this version
# on, SHA-256 before (ders_cli.digests). Header and index hashes are SHA-256 in every version.
BLAKE3_VERSION = 4

# The safetensors header of an archive begins with exactly these bytes, then 64 lowercase hex
# digits of the header hash, then a closing quote. A fixed position lets any reader find the
# hash without a JSON parser that keeps key order.
HEADER_HASH_KEY = "ders.header_sha256"
HEADER_PREFIX = b'{"__metadata__":{"' + HEADER_HASH_KEY.encode() + b'":"'
HASH_HEX_LEN = 64
META_FORMAT = "ders.format"
META_VERSION = "ders.version"
META_MANIFEST = "ders.manifest"

# Sharded archives (docs/FORMAT.md 10): an index holding the manifest, and shards holding the
# arrays. Version 3 is written only when an archive does not fit in one shard.
SHARDED_VERSION = 3
INDEX_HASH_KEY = "ders.index_sha256"
INDEX_PREFIX = b'{"metadata":{"' + INDEX_HASH_KEY.encode() + b'":"'
INDEX_SUFFIX = ".safetensors.index.json"  # transformers' name for a sharded checkpoint's index
SHARD_SUFFIX = ".safetensors"
META_SHARDS = "ders.shards"
META_INDEX = "ders.index"
MAX_INDEX_BYTES = 100_000_000
# transformers' save_pretrained default: shards that every file system and the Hub (50 GB per
# file) take, and that download in parallel.
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9

# Names of the arrays an archive stores besides passthrough tensors (which keep their own names).
RESERVED_PREFIX = "ders/"
SHARD_HEADER_NAME = "ders/shard/{index}/header"
SIDE_FILE_NAME = "ders/file/{index}"
GROUP_ARRAY_NAME = "ders/g/{group}/{array}"

# How a group's base is stored (docs/FORMAT.md, "Encoded bases"), and the format version that
# introduced each encoding: an archive is written in the oldest version that holds all of its.
BASE_RAW = "raw"  # an array of the group's dtype and shape
BASE_PLANES_ZSTD = "planes-zstd"  # a U8 array: one zstd frame of the base's byte planes
BASE_ENCODING_VERSION = {BASE_RAW: 1, BASE_PLANES_ZSTD: 2}

# --- safetensors -------------------------------------------------------------------------------

# Largest header the reference implementation accepts.
MAX_HEADER_BYTES = 100_000_000
HEADER_ALIGN = 8

# Bits per element of every dtype safetensors knows. Sub-byte types pack along the last axis.
DTYPE_BITS: dict[str, int] = {
    "F64": 64,
    "F32": 32,
    "F16": 16,
    "BF16": 16,
    "F8_E4M3": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2": 8,
    "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "F4": 4,
    "I64": 64,
    "I32": 32,
    "I16": 16,
    "I8": 8,
    "U64": 64,
    "U32": 32,
    "U16": 16,
    "U8": 8,
    "BOOL": 8,
    "C64": 64,
}

# The dtypes whose experts ders can decompose. Others always pass through byte for byte.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# (exponent bits, mantissa bits) of each: the lossless codec orders elements by exponent.
FLOAT_FIELDS: dict[str, tuple[int, int]] = {
    "F64": (11, 52),
    "F32": (8, 23),
    "F16": (5, 10),
    "BF16": (8, 7),
}

# --- codecs ------------------------------------------------------------------------------------

CODEC_SPARSE = "sparse"
CODEC_QUANT = "quant"
CODEC_LOSSLESS = "lossless"
CODEC_LOWRANK = "lowrank"
QUANT_BITS = (1, 2, 3, 4, 8)
# Elements sharing one scale and offset (quant, and sparse values quantized): the default.
DEFAULT_GROUP_SIZE = 128
# How the quant codec chooses each group's range: min/max, or the clip search (the default).
QUANT_METHODS = ("rtn", "mse")
DEFAULT_QUANT_METHOD = "mse"
# The method an archive that records none was written with (the first archives had only rtn).
RECORDED_QUANT_METHOD = "rtn"
# Per-group scale and offset of the quant codec are stored in this dtype (8 significant bits
# over the whole f32 range: f16 would lose the tiny scales of 8-bit deltas to subnormals).
QUANT_PARAM_DTYPE = "BF16"

# Index encodings of the sparse codec, by the bytes each needs for n elements and k kept.
INDEX_ALL = "all"  # k == n: nothing to store
INDEX_SEED = "seed"  # regenerated from a 64-bit seed: nothing to store beyond the manifest
INDEX_BITMAP = "bitmap"  # n bits
INDEX_GAPS = "gaps"  # LEB128 gaps between kept positions
# How the sparse codec chooses the kept positions, and scales the kept values.
SPARSE_MASKS = ("random", "magnitude")
SPARSE_RESCALES = ("inverse", "none", "norm")

# The mask generator (docs/FORMAT.md, "Random masks"): a keyed Feistel permutation.
MASK_ROUNDS = 4
SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
SPLITMIX_MUL1 = 0xBF58476D1CE4E5B9
SPLITMIX_MUL2 = 0x94D049BB133111EB
FMIX32_MUL1 = 0x85EBCA6B
FMIX32_MUL2 = 0xC2B2AE35

# What a group's base is (informative; synthesis is the same for every kind): the members' mean,
# a dense checkpoint's FFN, or the trained shared FFN of a DeRS-upcycled model.
BASE_KINDS = ("mean", "dense", "shared")

# --- expert groups -----------------------------------------------------------------------------

# A group counts as upcycled when every member's cosine to the base is at least this.
DEFAULT_UPCYCLED_COS = 0.9
# Pairwise cosines are computed exactly while N*N*numel stays under this many multiply-adds;
# above it, on a fixed sample of elements.
PAIRWISE_EXACT_BUDGET = 4 * 10**10
PAIRWISE_SAMPLE = 1 << 20

# --- I/O ---------------------------------------------------------------------------------------

COPY_CHUNK = 16 << 20
