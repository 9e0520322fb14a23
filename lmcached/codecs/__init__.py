"""Block payload codecs: lossless compression in the daemon, lossy quantisation in the client.

Codecs are entries of the plugin registry (category ``codec``), so a third party adds one with a
manifest row. :func:`lmcached.codecs.base.make_codec` builds one by name;
:func:`lmcached.codecs.base.encode_payload` / :func:`~lmcached.codecs.base.decode_payload` wrap a
payload in a small header that names its codec, so a stored value describes itself.
"""

from lmcached.codecs.base import (
    Codec,
    CodecError,
    codec_of,
    decode_payload,
    encode_payload,
    make_codec,
)

__all__ = ["Codec", "CodecError", "codec_of", "decode_payload", "encode_payload", "make_codec"]
