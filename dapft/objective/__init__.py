"""Layer 3, the objective: the DAP loss and its matching cost as pure functions on tensors
(`dap`), the AP-cost matcher, the criterion over decoder layers, and the loss that takes the place
of a model's own."""
