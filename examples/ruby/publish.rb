#!/usr/bin/env ruby
# Publish one app event to appevents over AMQP and wait for the broker's confirm.
#
# Usage:
#   ruby publish.rb --name "Contact Created" --user user-123 \
#     --payload '{"email": "ada@example.com", "first_name": "Ada", "last_name": "Lovelace"}' [--id evt_123]
#
# Environment:
#   AMQP_URL            broker URL (default amqp://guest:guest@127.0.0.1:5672/%2f)
#   APPEVENTS_EXCHANGE  exchange to publish to (default app_events)
#
# Prints the event id on success; exits non-zero with a message on stderr otherwise.
require "bunny"
require "json"
require "optparse"
require "securerandom"
require "time"

def fail!(message)
  abort "publish failed: #{message}"
end

opts = {}
parser = OptionParser.new do |o|
  o.banner = "usage: ruby publish.rb --name NAME --user USER_ID --payload JSON [--id ID]"
  o.on("--name NAME", "event name, also the routing key") { |v| opts[:name] = v }
  o.on("--user USER_ID", "id of the user in your app") { |v| opts[:user] = v }
  o.on("--payload JSON", "event payload, a JSON object") { |v| opts[:payload] = v }
  o.on("--id ID", "event id (default: a new UUID)") { |v| opts[:id] = v }
end
begin
  parser.parse!
rescue OptionParser::ParseError => e
  fail!("#{e.message}\n#{parser.banner}")
end
%i[name user payload].each { |key| fail!("--#{key} is required\n#{parser.banner}") unless opts[key] }

payload = begin
  JSON.parse(opts[:payload])
rescue JSON::ParserError => e
  fail!("--payload is not JSON: #{e.message}")
end
fail!("--payload must be a JSON object") unless payload.is_a?(Hash)

# The id is the idempotency key: publishing the same id again never runs a workflow twice,
# so a publish that was not confirmed can simply be retried with the same --id.
id = opts[:id] || SecureRandom.uuid
body = JSON.generate(
  "id" => id,
  "name" => opts[:name],
  "user_id" => opts[:user],
  "payload" => payload,
  "occurred_at" => Time.now.utc.iso8601
)
exchange_name = ENV.fetch("APPEVENTS_EXCHANGE", "app_events")

# A one-shot publisher should fail, not reconnect behind our back; Bunny logs to stdout
# unless told otherwise, and stdout is for the event id.
connection = Bunny.new(ENV.fetch("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
                       automatically_recover: false, log_file: $stderr)
begin
  connection.start
  channel = connection.create_channel
  # Idempotent: the same declaration the worker makes.
  exchange = channel.topic(exchange_name, durable: true)
  # mandatory: a message no queue would take comes back as a basic.return, handled before
  # its ack, instead of being dropped silently.
  returned = nil
  exchange.on_return { |info, _properties, _body| returned = info }
  # Publisher confirms: the broker acks each message once it has stored it, or nacks it.
  channel.confirm_select
  exchange.publish(body,
                   routing_key: opts[:name],
                   mandatory: true,
                   persistent: true, # delivery_mode 2: the broker writes the message to disk
                   content_type: "application/json",
                   message_id: id)
  unless channel.wait_for_confirms
    fail!("the broker refused event #{id} (nack); retrying with --id #{id} is safe")
  end
  if returned
    fail!("event #{id} was returned (#{returned.reply_code} #{returned.reply_text}): no queue is bound " \
          "to exchange #{exchange_name.inspect} for routing key #{opts[:name].inspect} " \
          "(has the appevents worker declared its queue?)")
  end
  puts id
rescue Bunny::TCPConnectionFailed => e
  fail!("cannot connect to the broker: #{e.message}")
rescue Bunny::Exception, SystemCallError, Timeout::Error => e
  fail!("event #{id} was not confirmed: #{e.class}: #{e.message}; retrying with --id #{id} is safe")
ensure
  connection.close if connection.open?
end
