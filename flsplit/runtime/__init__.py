"""The runtime: the client's trainer and ClientApp side, the server part and its step rules, schedules, a round's exchange state, aggregation, checkpoints, history."""
