"""The wire: record names and ``SplitConfig``, codecs, the wire's byte model, the reply gate."""
