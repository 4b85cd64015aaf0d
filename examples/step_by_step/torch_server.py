import sys

import octopusd
from octopusd import Server

if __name__ == "__main__":
    # init FedML-style arguments (--cf, --rank)
    args = octopusd.init()
    # init device
    device = octopusd.device.get_device(args)
    # load data (the config's dataset plugin: mnist)
    dataset, output_dim = octopusd.data.load(args)
    # load model (the config's model plugin: lr)
    model = octopusd.model.create(args, output_dim)
    # start the server
    sys.exit(Server(args, device, dataset, model).run())
