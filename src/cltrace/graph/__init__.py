"""Attribution graphs: computing, pruning, scoring, saving and exporting them."""
