"""GRU4Rec: the network, its losses, negative sampling and the row-sparse optimiser."""
