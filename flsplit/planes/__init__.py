"""Data planes: the server half (``dataplane``), the client half (``endpoint``), Flower messages, the stream plane, an in-process grid."""
