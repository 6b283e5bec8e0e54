"""Federated fine-tuning of svp models on Flower.

* `client_app`: a ClientApp whose clients fine-tune an svp model on their own
  shard (SVP by default) and send back their update, optionally as f16 or int8.
* `server_app`: a ServerApp running FedAvg (weighted by samples) from an svp
  model file, rejecting updates that do not fit the model, and rewriting the
  global model file atomically after every round.
* `shards`: seeded non-IID splits of a data set among clients.
* `codec`: weight updates to and from the arrays that travel.
"""
