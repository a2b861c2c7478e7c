// The ingestor worker on Azure Container Apps. KEDA's azure-servicebus scaler adds replicas
// as the queue's active message count grows; it authenticates with the platform identity,
// which the worker's own code cannot use (identitySettings lifecycle None).

param location string
param tags object
param environmentName string
param appName string
param logAnalyticsWorkspaceName string
param image string
param registryServer string
param registryName string
param workerIdentityId string
param workerIdentityClientId string
param platformIdentityId string
param platformIdentityPrincipalId string
param serviceBusNamespaceName string
param queueName string
param queueUrl string
param kustoClusterUri string
param kustoDatabaseName string
param minReplicas int
param maxReplicas int
param messagesPerReplica int
param cpu string
param memory string
param healthPort int

var acrPullRole = '7f951dda-4ed3-4680-a7ca-43fe172d538d' // AcrPull
var healthProbe = {
  path: '/healthz'
  port: healthPort
  scheme: 'HTTP'
}

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' existing = {
  name: logAnalyticsWorkspaceName
}

resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' existing = {
  name: empty(registryName) ? 'unused' : registryName
}

resource acrPull 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(registryName)) {
  name: guid(registry.id, platformIdentityPrincipalId, acrPullRole)
  scope: registry
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', acrPullRole)
    principalId: platformIdentityPrincipalId
    principalType: 'ServicePrincipal'
    description: 'langgraph-checkpoint-kusto: Container Apps pulls the worker image'
  }
}

resource containerAppsEnvironment 'Microsoft.App/managedEnvironments@2025-01-01' = {
  name: environmentName
  location: location
  tags: tags
  properties: {
    appLogsConfiguration: {
      destination: 'log-analytics'
      logAnalyticsConfiguration: {
        customerId: workspace.properties.customerId
        sharedKey: workspace.listKeys().primarySharedKey
      }
    }
    workloadProfiles: [
      {
        name: 'Consumption'
        workloadProfileType: 'Consumption'
      }
    ]
  }
}

resource app 'Microsoft.App/containerApps@2025-01-01' = {
  name: appName
  location: location
  tags: tags
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${workerIdentityId}': {}
      '${platformIdentityId}': {}
    }
  }
  properties: {
    environmentId: containerAppsEnvironment.id
    workloadProfileName: 'Consumption'
    configuration: {
      // No ingress: the worker pulls from the queue. Probes reach the container directly.
      activeRevisionsMode: 'Single'
      maxInactiveRevisions: 5
      registries: empty(registryServer) ? [] : [
        {
          server: registryServer
          identity: platformIdentityId
        }
      ]
      identitySettings: [
        {
          identity: workerIdentityId
          lifecycle: 'Main'
        }
        {
          identity: platformIdentityId
          lifecycle: 'None'
        }
      ]
    }
    template: {
      // On scale-in the worker stops receiving, finishes its batch and settles it.
      terminationGracePeriodSeconds: 60
      containers: [
        {
          name: 'worker'
          image: image
          resources: {
            cpu: json(cpu)
            memory: memory
          }
          env: [
            {
              name: 'LANGGRAPH_KUSTO_QUEUE'
              value: queueUrl
            }
            {
              name: 'LANGGRAPH_KUSTO_CLUSTER'
              value: kustoClusterUri
            }
            {
              name: 'LANGGRAPH_KUSTO_DATABASE'
              value: kustoDatabaseName
            }
            {
              // DefaultAzureCredential picks the worker identity among the app's identities.
              name: 'AZURE_CLIENT_ID'
              value: workerIdentityClientId
            }
            {
              name: 'LANGGRAPH_KUSTO_HEALTH_PORT'
              value: string(healthPort)
            }
          ]
          probes: [
            {
              type: 'Startup'
              httpGet: healthProbe
              initialDelaySeconds: 2
              periodSeconds: 5
              timeoutSeconds: 3
              failureThreshold: 24
            }
            {
              type: 'Liveness'
              httpGet: healthProbe
              periodSeconds: 30
              timeoutSeconds: 5
              failureThreshold: 3
            }
            {
              type: 'Readiness'
              httpGet: healthProbe
              periodSeconds: 10
              timeoutSeconds: 5
              failureThreshold: 3
            }
          ]
        }
      ]
      scale: {
        minReplicas: minReplicas
        maxReplicas: maxReplicas
        pollingInterval: 15
        cooldownPeriod: 300
        rules: [
          {
            name: 'outbox-queue-length'
            custom: {
              type: 'azure-servicebus'
              metadata: {
                namespace: serviceBusNamespaceName
                queueName: queueName
                messageCount: string(messagesPerReplica)
              }
              // Managed identity instead of a connection string: the namespace has no SAS keys.
              identity: platformIdentityId
            }
          }
        ]
      }
    }
  }
  dependsOn: [
    acrPull
  ]
}

output appName string = app.name
output environmentId string = containerAppsEnvironment.id
