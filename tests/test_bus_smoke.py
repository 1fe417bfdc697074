from livepipe.bus.client import BusClient


def test_client_roundtrip_through_broker(bus_cfg):
    with BusClient("a", bus_cfg, ["text.in"]) as sub, BusClient("b", bus_cfg) as pub:
        sub.wait_ready()
        pub.wait_ready()
        pub.wait_subscriber("text.in")
        pub.publish("text.in", "text", text="hello")
        msg = sub.recv(5)
        assert msg is not None and msg.topic == "text.in" and msg["text"] == "hello"
        assert msg["src"] == "b" and msg["seq"] == 0
