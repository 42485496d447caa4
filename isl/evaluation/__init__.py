"""`isl evaluate`: ISL against the baseline and its peers on held-out labelled cases, with statistics and a
figure."""
