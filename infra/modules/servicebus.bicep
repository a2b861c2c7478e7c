// The outbox queue: sessions give FIFO per thread (session id = thread id), duplicate
// detection drops re-sent events (message ids are deterministic), and whatever cannot be
// delivered or expires goes to the dead-letter queue with a reason instead of vanishing.
// Roles are granted on the queue, not the namespace.

param location string
param tags object
param namespaceName string

@allowed([
  'Standard'
  'Premium'
])
param sku string
param premiumCapacity int
param queueName string
param duplicateDetectionWindow string
param maxDeliveryCount int
param lockDuration string
param messageTimeToLive string

@description('Object ids that publish events (Azure Service Bus Data Sender).')
param senderPrincipalIds array

@description('Object ids that receive and settle events (Azure Service Bus Data Receiver).')
param receiverPrincipalIds array

@description('Object ids of the KEDA scaler: it reads queue runtime properties, which needs Manage (Azure Service Bus Data Owner).')
param scalerPrincipalIds array

@description('[{ principalId, principalType }] who list, replay and purge dead letters (Receiver + Sender).')
param operators array

param logAnalyticsWorkspaceId string

var roles = {
  sender: '69a216fc-b8fb-44d8-bc22-1f3c2cd27a39' // Azure Service Bus Data Sender
  receiver: '4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0' // Azure Service Bus Data Receiver
  owner: '090c5cfd-751d-490a-894a-3ce6f1109419' // Azure Service Bus Data Owner
}

var premiumSku = {
  name: 'Premium'
  tier: 'Premium'
  capacity: premiumCapacity
}
var standardSku = {
  name: 'Standard'
  tier: 'Standard'
}

resource sbNamespace 'Microsoft.ServiceBus/namespaces@2024-01-01' = {
  name: namespaceName
  location: location
  tags: tags
  sku: sku == 'Premium' ? premiumSku : standardSku
  properties: {
    // Entra ID only: no SAS keys exist that could leak; every client uses a managed identity.
    disableLocalAuth: true
    minimumTlsVersion: '1.2'
    publicNetworkAccess: 'Enabled'
    zoneRedundant: sku == 'Premium'
  }
}

resource queue 'Microsoft.ServiceBus/namespaces/queues@2024-01-01' = {
  parent: sbNamespace
  name: queueName
  properties: {
    requiresSession: true
    requiresDuplicateDetection: true
    duplicateDetectionHistoryTimeWindow: duplicateDetectionWindow
    maxDeliveryCount: maxDeliveryCount
    lockDuration: lockDuration
    defaultMessageTimeToLive: messageTimeToLive
    deadLetteringOnMessageExpiration: true
    enableBatchedOperations: true
    enablePartitioning: false
    maxSizeInMegabytes: 5120
  }
}

resource senders 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in senderPrincipalIds: {
  name: guid(queue.id, principalId, roles.sender)
  scope: queue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.sender)
    principalId: principalId
    principalType: 'ServicePrincipal'
    description: 'langgraph-checkpoint-kusto: agent apps publish checkpoint events'
  }
}]

resource receivers 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in receiverPrincipalIds: {
  name: guid(queue.id, principalId, roles.receiver)
  scope: queue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.receiver)
    principalId: principalId
    principalType: 'ServicePrincipal'
    description: 'langgraph-checkpoint-kusto: the ingestor worker receives and settles events'
  }
}]

resource scalers 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for principalId in scalerPrincipalIds: {
  name: guid(queue.id, principalId, roles.owner)
  scope: queue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.owner)
    principalId: principalId
    principalType: 'ServicePrincipal'
    description: 'langgraph-checkpoint-kusto: KEDA reads the queue length (runtime properties need Manage); platform-only identity'
  }
}]

resource operatorReceivers 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for operator in operators: {
  name: guid(queue.id, operator.principalId, roles.receiver)
  scope: queue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.receiver)
    principalId: operator.principalId
    principalType: operator.principalType
    description: 'langgraph-checkpoint-kusto: operators read dead letters'
  }
}]

resource operatorSenders 'Microsoft.Authorization/roleAssignments@2022-04-01' = [for operator in operators: {
  name: guid(queue.id, operator.principalId, roles.sender)
  scope: queue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.sender)
    principalId: operator.principalId
    principalType: operator.principalType
    description: 'langgraph-checkpoint-kusto: operators replay dead letters'
  }
}]

resource diagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: sbNamespace
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    logs: [
      {
        categoryGroup: 'allLogs'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

output namespaceName string = sbNamespace.name
output queueName string = queue.name

// sb://<namespace>.servicebus.windows.net/<queue>, from the endpoint so sovereign clouds work.
output queueUrl string = '${replace(replace(sbNamespace.properties.serviceBusEndpoint, 'https://', 'sb://'), ':443/', '/')}${queue.name}'
